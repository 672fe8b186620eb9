"""grain pipeline: shapes and padding, seeded shuffles, process shards, global arrays on the mesh,
exact mid-epoch resume, worker processes, and bad records counted or raised through the loader."""

import logging as std_logging
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from kervljepa_jax import findings, sharding
from kervljepa_jax.data import default_data_config, pipeline, records, synthetic, text
from tests.data import test_ctrate

D, N_MAX, T, TC = 16, 64, 256, 24
ARRAY_KEYS = tuple(pipeline.batch_spec(default_data_config()))


def small_config(workdir, **overrides):
    c = default_data_config()
    c.embed_dim, c.max_slices = D, N_MAX
    c.min_synthetic_slices, c.max_synthetic_slices = 20, 80     # some volumes exceed N_MAX
    c.num_train, c.num_valid = 40, 12
    c.batch_size, c.max_tokens, c.max_condition_tokens = 8, T, TC
    c.tokenizer_vocab_size, c.workdir, c.read_threads = 600, str(workdir), 2
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def tokenizer(workdir):
    return pipeline.make_tokenizer(small_config(workdir))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh()


def make(workdir, tokenizer, mesh=None, **overrides):
    return pipeline.Pipeline(small_config(workdir, **overrides), "train", tokenizer, mesh)


def names(batches):
    return [n for b in batches for n in b["meta"]["volume_name"]]


def host(batch):
    return {k: np.asarray(batch[k]) for k in ARRAY_KEYS}


def assert_same_batches(a, b):
    assert len(a) == len(b) and names(a) == names(b)
    for x, y in zip(a, b):
        for key in ARRAY_KEYS:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)
        assert x["meta"] == y["meta"]


@pytest.fixture(scope="module")
def epoch0(workdir, tokenizer):
    it = make(workdir, tokenizer).epoch(0)
    return list(it), it.report.as_dict()


def test_batches_have_the_spec_shapes_and_padding(workdir, tokenizer, epoch0):
    batches, report = epoch0
    config = small_config(workdir)
    spec = pipeline.batch_spec(config)
    assert len(batches) == 5 == make(workdir, tokenizer).steps_per_epoch()
    source = synthetic.SyntheticSource(config, "train")
    visual = tokenizer.convert_tokens_to_ids(text.VISUAL_TOKEN)
    for batch in batches:
        assert set(batch) == set(spec) | {"meta"}
        for key, (shape, dtype) in spec.items():
            assert batch[key].shape == (8, *shape) and batch[key].dtype == dtype, key
        n = batch["num_slices"]
        np.testing.assert_array_equal(batch["valid"].sum(1), n)
        assert (n <= N_MAX).all() and (n >= 20).all()
        pad = ~batch["valid"]
        assert not batch["slices"][pad].any() and not batch["z_mm"][pad].any()
        assert ((batch["input_ids"] == visual).sum(1) == 32).all()
        assert (batch["loss_mask"] <= batch["attention_mask"]).all() and batch["loss_mask"].any(1).all()
        np.testing.assert_array_equal(batch["condition_valid"], batch["labels"].astype(bool))
        assert not batch["condition_lengths"][~batch["condition_valid"]].any()
        assert (batch["condition_lengths"][batch["condition_valid"]] > 0).all()
        assert batch["target_mask"].any(1).all()
        for row, name in enumerate(batch["meta"]["volume_name"]):       # rows are the source's records
            record = source[int(name.split("_")[1]) - 1]
            k = record["slices"].shape[0]
            assert n[row] == k
            np.testing.assert_array_equal(batch["slices"][row, :k], record["slices"].astype(np.float16))
            np.testing.assert_allclose(batch["z_mm"][row, :k], record["z_mm"])
            np.testing.assert_array_equal(batch["labels"][row], record["labels"])
    # Volumes over N_MAX were subsampled, and the epoch report counted each one.
    over = sum(synthetic.SyntheticSource(small_config(workdir, max_slices=600), "train")[i]["slices"].shape[0]
               > N_MAX for i in range(40))
    assert over > 0 and report["subsampled_slices"] == over and report["examples"] == 40


def test_response_text_follows_the_mode(workdir, tokenizer, epoch0):
    batch = epoch0[0][0]
    for row, response in enumerate(batch["meta"]["response"]):
        ids = batch["input_ids"][row][batch["loss_mask"][row]]
        assert tokenizer.decode(ids.tolist()).startswith(response[:40])
        positives = findings.indices_from_labels(batch["labels"][row])
        assert (response == findings.NORMAL_SENTENCE) == (not positives)
    raw = next(iter(make(workdir, tokenizer, text_mode="raw").epoch(0)))
    source = synthetic.SyntheticSource(small_config(workdir), "train")
    name = raw["meta"]["volume_name"][0]
    assert raw["meta"]["response"][0] == source[int(name.split("_")[1]) - 1]["report"]


def test_batch_rows_equal_the_per_text_reference(workdir, tokenizer, epoch0):
    """The vectorised batch assembly writes what the per-text functions give for each row."""
    config = small_config(workdir)
    ids = pipeline.tokenizers.special_ids(tokenizer)
    prompt = text.encode_prompt(tokenizer, config.num_visual_tokens)
    raw = list(make(workdir, tokenizer, text_mode="raw", max_tokens=150, max_condition_tokens=6).epoch(0))
    source = synthetic.SyntheticSource(config, "train")
    for batch, mode, t, tc in [(b, "positive_findings", T, TC) for b in epoch0[0]] + [(b, "raw", 150, 6) for b in raw]:
        for row, response in enumerate(batch["meta"]["response"]):
            chat, _ = text.encode_chat(tokenizer, prompt, response, t, ids["pad"], ids["eot"])
            for key, want in chat.items():
                np.testing.assert_array_equal(batch[key][row], want, err_msg=key)
            # The target: the positive findings in class order (the response draws its order per epoch).
            record = source[int(batch["meta"]["volume_name"][row].split("_")[1]) - 1]
            sentences = text.ordered_sentences(text.class_segments(record["report"], record["labels"]))
            ordered = " ".join(sentences)
            target, length, _ = text.encode_padded(tokenizer, ordered, t, ids["pad"])
            np.testing.assert_array_equal(batch["target_ids"][row], target)
            np.testing.assert_array_equal(batch["target_mask"][row], np.arange(t) < length)
            if mode == "positive_findings":
                assert len(response) == len(ordered) and all(sentence in response for sentence in sentences)
            assert batch["record_index"][row] == int(batch["meta"]["volume_name"][row].split("_")[1]) - 1
            for c, condition in enumerate(batch["meta"]["condition_texts"][row]):
                want, length, _ = text.encode_padded(tokenizer, condition, tc, ids["pad"])
                np.testing.assert_array_equal(batch["condition_ids"][row, c], want)
                assert batch["condition_lengths"][row, c] == length


def test_class_order_is_drawn_per_epoch_and_volume(workdir, tokenizer):
    loader = make(workdir, tokenizer)
    epochs = [{n: r for b in loader.epoch(e) for n, r in zip(b["meta"]["volume_name"], b["meta"]["response"])}
              for e in range(3)]
    assert epochs[0] == {n: r for b in make(workdir, tokenizer).epoch(0)       # a fresh loader: same texts
                         for n, r in zip(b["meta"]["volume_name"], b["meta"]["response"])}
    changed = [n for n in epochs[0] if len({epoch[n] for epoch in epochs}) > 1]
    assert changed                                                              # new epoch, new order
    for n in epochs[0]:                                                         # same sentences each time
        assert len({tuple(sorted(findings.split_sentences(epoch[n]))) for epoch in epochs}) == 1


def test_each_epoch_is_a_seeded_shuffle_of_every_record(workdir, tokenizer, epoch0):
    first = names(epoch0[0])
    assert sorted(first) == sorted(synthetic.volume_name("train", i) for i in range(40))
    assert names(make(workdir, tokenizer).epoch(0)) == first            # same seed, same order
    second = names(make(workdir, tokenizer).epoch(1))
    assert sorted(second) == sorted(first) and second != first         # new epoch, new order
    assert names(make(workdir, tokenizer, seed=1).epoch(0)) != first
    ordered = names(make(workdir, tokenizer, shuffle=False).epoch(0))
    assert ordered == [synthetic.volume_name("train", i) for i in range(40)]


def test_repeat_factors_by_hand():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])     # f = 0.75, 0.25, 0 (class 3 absent)
    factors = pipeline.repeat_factors(labels, 0.5)
    # r_c = max(1, sqrt(0.5 / f)) = 1, sqrt(2); a volume takes its largest r_c, a normal one 1
    np.testing.assert_allclose(factors, [1.0, np.sqrt(2.0), 1.0, 1.0])
    np.testing.assert_allclose(pipeline.repeat_factors(labels, 0.25), 1.0)   # sqrt(0.25/0.25) = 1


def test_repeat_factor_order_draws_records_in_proportion_to_their_factors():
    factors = np.array([1.0, 1.0, 2.5, 1.0, 1.6, 1.0])
    rng = np.random.default_rng(0)
    counts = np.zeros(len(factors))
    for _ in range(4000):
        order = pipeline.repeat_factor_order(factors, len(factors), rng)
        assert len(order) == len(factors) and order.min() >= 0 and order.max() < len(factors)
        counts += np.bincount(order, minlength=len(factors))
    share = counts / counts.sum()
    np.testing.assert_allclose(share, factors / factors.sum(), atol=0.01)
    ones = pipeline.repeat_factor_order(np.ones(5), 5, np.random.default_rng(1))
    assert sorted(ones) == list(range(5))                                 # all factors 1: a permutation


def test_repeat_factor_sampling_shows_rare_findings_more_often_in_train_only(workdir, tokenizer):
    config = small_config(workdir, num_train=200, repeat_factor_threshold=0.5)
    source = pipeline.make_source(config, "train")
    labels = np.stack(source.texts()[1])
    factors = pipeline.repeat_factors(labels, 0.5)
    balanced, plain = pipeline.Pipeline(config, "train", tokenizer), make(workdir, tokenizer, num_train=200)
    seen_balanced = np.concatenate([balanced.epoch_order(e) for e in range(30)])
    seen_plain = np.concatenate([plain.epoch_order(e) for e in range(30)])
    assert len(seen_balanced) == len(seen_plain) == 30 * 200              # an epoch keeps its steps
    boosted = factors > 1.5
    assert boosted.any()
    share = lambda seen: np.isin(seen, np.flatnonzero(boosted)).mean()    # noqa: E731
    assert share(seen_plain) == boosted.mean()                            # a permutation per epoch
    expected = factors[boosted].sum() / factors.sum()                     # draws in proportion to r
    assert expected > boosted.mean() + 0.1 and abs(share(seen_balanced) - expected) < 0.02
    np.testing.assert_array_equal(balanced.epoch_order(3), pipeline.Pipeline(config, "train", tokenizer).epoch_order(3))
    valid = pipeline.Pipeline(config, "valid", tokenizer)
    assert valid.repeat_factors is None and sorted(valid.epoch_order(0)) == list(range(12))
    with pytest.raises(records.DataError, match="data.repeat_factor_threshold=-1"):
        make(workdir, tokenizer, repeat_factor_threshold=-1.0)


def test_shards_by_process_index(workdir, tokenizer):
    config = small_config(workdir, num_train=41)
    shards = []
    for index in (0, 1):
        p = pipeline.Pipeline(config, "train", tokenizer, process_index=index, process_count=2)
        assert p.local_batch_size == 4 and p.steps_per_epoch() == 5
        it = p.epoch(0)
        batches = list(it)
        assert all(b["slices"].shape[0] == 4 for b in batches)
        assert it.report.as_dict()["dropped_shard_remainder"] == 1     # 41 = 2 x 20 + 1, counted
        shards.append(set(names(batches)))
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 20
    with pytest.raises(records.DataError, match="batch_size=8 is not divisible by the 3 processes"):
        pipeline.Pipeline(config, "train", tokenizer, process_index=0, process_count=3)


def test_batches_are_global_arrays_on_the_mesh(workdir, tokenizer, mesh, epoch0):
    batch = next(iter(make(workdir, tokenizer, mesh).epoch(0)))
    for key in ARRAY_KEYS:
        x = batch[key]
        assert isinstance(x, jax.Array) and x.shape[0] == 8
        assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        assert x.sharding.spec[0] == ("data", "fsdp") and all(a is None for a in x.sharding.spec[1:])
        assert len(x.addressable_shards) == 8 and all(s.data.shape[0] == 1 for s in x.addressable_shards)
    assert_same_batches([batch], epoch0[0][:1])                         # same values as on the host
    assert isinstance(batch["meta"]["volume_name"], list)
    assert pipeline.batch_sharding(mesh, 3).spec == PartitionSpec(("data", "fsdp"), None, None)


def test_restore_continues_mid_epoch_exactly(workdir, tokenizer, mesh, epoch0):
    full, full_report = epoch0
    it = make(workdir, tokenizer, mesh).epoch(0)
    head = [next(it), next(it)]
    state = pipeline.state_from_json(pipeline.state_to_json(it.get_state()))   # as the checkpoint has it
    assert state["epoch"] == 0 and state["split"] == "train"
    resumed = make(workdir, tokenizer, mesh).restore(state)     # a fresh pipeline, as after a restart
    tail = list(resumed)
    assert_same_batches(head + tail, full)
    assert resumed.report.as_dict() == full_report              # the epoch's counts carry over
    later = make(workdir, tokenizer).epoch(1)                   # and the next epoch is untouched
    assert names(later) == names(make(workdir, tokenizer).epoch(1))
    valid = pipeline.Pipeline(small_config(workdir), "valid", tokenizer)
    with pytest.raises(records.DataError, match="state is for split 'train'"):
        valid.restore(state)


def test_restore_at_epoch_end_yields_nothing(workdir, tokenizer):
    it = make(workdir, tokenizer).epoch(2)
    list(it)
    assert list(make(workdir, tokenizer).restore(it.get_state())) == []


@pytest.mark.parametrize("overrides", [{"num_workers": 1}, {"read_threads": 0}, {"read_threads": 8}],
                         ids=["one_worker", "no_read_threads", "eight_read_threads"])
def test_workers_and_read_threads_give_the_same_batches(workdir, tokenizer, epoch0, overrides):
    it = make(workdir, tokenizer, **overrides).epoch(0)
    head = [next(it), next(it)]
    state = it.get_state()
    tail = list(make(workdir, tokenizer, **overrides).restore(state))
    assert_same_batches(head + tail, epoch0[0])
    flag = next(iter(overrides))
    with pytest.raises(records.DataError, match=f"{flag}=-1"):
        make(workdir, tokenizer, **{flag: -1})


def test_recycled_batch_buffers_never_change_a_held_batch(workdir, tokenizer):
    loader = make(workdir, tokenizer, read_threads=2)
    held, copies = [], []
    for epoch in (0, 1):
        for batch in loader.epoch(epoch):
            held.append(batch)
            copies.append(batch["slices"].copy())
    for batch, copy in zip(held, copies):                      # still intact after 10 more batches
        np.testing.assert_array_equal(batch["slices"], copy)
    del held, batch
    seen = set()
    for epoch in (2, 3, 4):                                    # nothing held: buffers are reused
        for batch in loader.epoch(epoch):
            seen.add(id(batch["slices"].base))
    assert seen <= {id(b) for b in loader.buffer_pool._buffers} and len(seen) < 15   # 15 batches


def test_stack_slices_copies_only_rows_not_read_in_place():
    buffer = np.full((4, 5, 3), 7, np.float16)                # a recycled buffer: stale values
    out = buffer[:3]
    rng = np.random.default_rng(0)
    in_place = out[0, :5]
    in_place[:] = rng.normal(size=(5, 3))
    short_in_place = out[1, :2]
    short_in_place[:] = rng.normal(size=(2, 3))
    elsewhere = rng.normal(size=(4, 3)).astype(np.float32)   # another array (and dtype): copied
    want = [in_place.copy(), short_in_place.copy(), elsewhere.astype(np.float16)]
    got = pipeline.stack_slices([in_place, short_in_place, elsewhere], out)
    assert got is out
    for b, x in enumerate(want):
        np.testing.assert_array_equal(got[b, : len(x)], x)
        assert not got[b, len(x):].any()                      # zeros past n, not stale values
    assert (buffer[3] == 7).all()                              # rows past B untouched


def test_drop_remainder_is_counted_or_kept(workdir, tokenizer):
    it = make(workdir, tokenizer, num_train=21).epoch(0)
    assert [b["slices"].shape[0] for b in it] == [8, 8]
    assert it.report.as_dict()["dropped_remainder"] == 5
    kept = list(make(workdir, tokenizer, num_train=21, drop_remainder=False).epoch(0))
    assert [b["slices"].shape[0] for b in kept] == [8, 8, 5]


def test_over_max_slices_error_policy_names_the_volume(workdir, tokenizer):
    with pytest.raises(records.DataError, match=r"synthetic train_\d+_a_1.nii.gz: \d+ slices > data.max_slices=64"):
        list(make(workdir, tokenizer, over_max_slices="error").epoch(0))
    it = make(workdir, tokenizer, over_max_slices="error", skip_bad_records=True).epoch(0)
    kept = names(list(it))
    report = it.report.as_dict()
    assert report["skipped"] > 0 and "subsampled_slices" not in report
    assert len(kept) + report["skipped"] + report.get("dropped_remainder", 0) == 40


def test_config_errors_are_one_line(workdir, tokenizer):
    for overrides, needle in (({"text_mode": "x"}, "data.text_mode='x'"), ({"source": "x"}, "data.source='x'"),
                              ({"max_tokens": 40}, "data.max_tokens=40")):
        with pytest.raises(records.DataError) as info:
            make(workdir, tokenizer, **overrides)
        assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(records.DataError, match="split 'test'"):
        pipeline.Pipeline(small_config(workdir), "test", tokenizer)


# ---------------------------------------------------------------------------------------------
# Bad CT-RATE input through the loader: a one-line error, or a skip counted at every epoch end.

@pytest.fixture
def ctrate_config(tmp_path, workdir):
    test_ctrate.write_layout(str(tmp_path))
    return test_ctrate.small_config(str(tmp_path), batch_size=3, workdir=str(workdir), read_threads=2,
                                    tokenizer_vocab_size=600, max_tokens=T, max_condition_tokens=TC)


@pytest.mark.parametrize("defect", test_ctrate.DEFECTS, ids=lambda f: f.__name__[len("_defect_"):])
def test_bad_record_raises_or_is_a_counted_skip(ctrate_config, tokenizer, defect, caplog):
    path, row, what = defect(ctrate_config.root)
    with pytest.raises(records.DataError) as info:
        list(pipeline.Pipeline(ctrate_config, "train", tokenizer).epoch(0))
    message = str(info.value)
    assert "\n" not in message and path in message and row in message and what in message
    ctrate_config.skip_bad_records = True
    loader = pipeline.Pipeline(ctrate_config, "train", tokenizer)
    for epoch in (0, 1):
        caplog.clear()
        with caplog.at_level(std_logging.WARNING):
            it = loader.epoch(epoch)
            seen = names(list(it))
        assert it.report.as_dict()["skipped"] == 1 and len(seen) == 9     # 10 rows, 1 bad, 3 batches
        assert path in it.report.skipped[0] and what in it.report.skipped[0]
        assert f"epoch {epoch}: 1 bad records skipped" in caplog.text and what in caplog.text


@pytest.mark.parametrize("shuffle", [False, True])
def test_restore_after_skips_at_every_batch_boundary(ctrate_config, tokenizer, shuffle):
    """A skipped record makes batches straddle grain chunks; every cut point must still resume exactly."""
    test_ctrate._defect_nan(ctrate_config.root)
    ctrate_config.skip_bad_records, ctrate_config.shuffle, ctrate_config.drop_remainder = True, shuffle, False
    full_it = pipeline.Pipeline(ctrate_config, "train", tokenizer).epoch(0)
    full = list(full_it)
    assert [b["slices"].shape[0] for b in full] == [3, 3, 3]          # 10 rows, 1 skipped
    if not shuffle:
        assert names(full[:1]) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_4_a_1.nii.gz"]
    used = []
    for cut in range(len(full) + 1):
        it = pipeline.Pipeline(ctrate_config, "train", tokenizer).epoch(0)
        head = [next(it) for _ in range(cut)]
        state = pipeline.state_from_json(pipeline.state_to_json(it.get_state()))
        used.append(state["rows_used"])
        resumed = pipeline.Pipeline(ctrate_config, "train", tokenizer).restore(state)
        assert_same_batches(head + list(resumed), full)
        assert resumed.report.as_dict() == full_it.report.as_dict()
        assert len(resumed.report.skipped) == 1 and "NaN/Inf" in resumed.report.skipped[0]
    assert any(used)                        # some cut fell inside a chunk


def test_report_with_the_placeholder_text_is_a_bad_record(ctrate_config, tokenizer):
    def change(rows):
        rows[2][rows[0].index("Findings_EN")] += f" {text.VISUAL_TOKEN} The heart is enlarged."
        return rows
    test_ctrate.edit_csv(test_ctrate.csv_path(ctrate_config.root, "reports"), change)
    # Positive-findings text keeps only sentences of positive classes; raw text keeps them all.
    ctrate_config.text_mode = "raw"
    with pytest.raises(records.DataError, match=r"volume train_2_a_1.nii.gz: the report contains"):
        list(pipeline.Pipeline(ctrate_config, "train", tokenizer).epoch(0))
    ctrate_config.skip_bad_records = True
    it = pipeline.Pipeline(ctrate_config, "train", tokenizer).epoch(0)
    assert len(names(it)) == 9 and it.report.as_dict()["skipped"] == 1


def test_a_file_changed_after_its_scan_is_scanned_again(ctrate_config, tokenizer):
    """The NaN/Inf scan runs once per unchanged file; a rewritten file is scanned again."""
    loader = pipeline.Pipeline(ctrate_config, "train", tokenizer)
    assert len(names(loader.epoch(0))) == 9                 # 10 rows, batch 3, remainder dropped
    path = test_ctrate.embedding_path(ctrate_config.root, 3)
    x = np.load(path)
    x[1, 2] = np.inf
    np.save(path, x)                                         # same size, new content
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(records.DataError, match="NaN/Inf"):
        list(loader.epoch(1))


def test_ctrate_tokenizer_is_trained_on_the_reports_and_cached(ctrate_config):
    tok = pipeline.make_tokenizer(ctrate_config)
    again = pipeline.make_tokenizer(ctrate_config)
    assert len(tok) == len(again) <= 600
    report = test_ctrate.ctrate.CtRateSource(ctrate_config, "train")[0]["report"]
    assert tok.decode(tok.encode(report, add_special_tokens=False)) == report
    assert int((text.encode_prompt(tok, 32) == tok.convert_tokens_to_ids(text.VISUAL_TOKEN)).sum()) == 32


def test_text_rows_follow_each_record(workdir, tokenizer, epoch0):
    pipe = make(workdir, tokenizer)
    rows = pipe.text_rows()
    n, c = len(pipe.source), findings.NUM_CLASSES
    assert rows["condition_ids"].shape == (n, c, TC) and rows["target_ids"].shape == (n, T)
    # The rows are what the batches carry for that record.
    batch = epoch0[0][0]
    for row, index in enumerate(batch["record_index"]):
        np.testing.assert_array_equal(rows["condition_ids"][index], batch["condition_ids"][row])
        np.testing.assert_array_equal(rows["condition_lengths"][index], batch["condition_lengths"][row])
        np.testing.assert_array_equal(rows["target_ids"][index], batch["target_ids"][row])
        assert rows["target_lengths"][index] == batch["target_mask"][row].sum()


def test_ordered_batches_follow_each_record(workdir, tokenizer, epoch0):
    pipe = make(workdir, tokenizer, repeat_factor_threshold=0.5)
    # Every record once, in index order, whatever the shuffle and repeat factors; the rows are
    # what an epoch's batches carry for that record.
    ordered = list(pipe.ordered_batches())
    index = np.concatenate([b["record_index"] for b in ordered])
    np.testing.assert_array_equal(index, np.arange(len(pipe.source)))
    by_record = {int(i): b["slices"][r] for b in ordered for r, i in enumerate(b["record_index"])}
    batch = epoch0[0][0]
    for row, record in enumerate(batch["record_index"]):
        np.testing.assert_array_equal(by_record[int(record)], batch["slices"][row])


def test_join_adds_to_each_host_batch_before_placement_and_leaves_the_state(workdir, tokenizer, mesh, epoch0):
    """`join` sees each process-local host batch (numpy, this process's record_index); what it adds
    is placed on the mesh with the rest, and the iterator's checkpointed state does not change."""
    seen = []

    def join(batch):
        assert isinstance(batch["record_index"], np.ndarray)
        seen.append(batch["record_index"])
        return {**batch, "doubled": 2 * batch["record_index"]}
    joined, plain = make(workdir, tokenizer, mesh).epoch(0, join), make(workdir, tokenizer, mesh).epoch(0)
    first, _ = next(joined), next(plain)
    assert first["doubled"].sharding == first["record_index"].sharding
    np.testing.assert_array_equal(np.asarray(first["doubled"]), 2 * np.asarray(first["record_index"]))
    assert joined.get_state() == plain.get_state()
    tail = list(make(workdir, tokenizer, mesh).restore(joined.get_state(), join))
    assert all("doubled" in b for b in tail) and len(seen) == 1 + len(tail)
    assert_same_batches([first, *tail], epoch0[0])                   # the data itself is unchanged


def test_a_batch_that_does_not_split_over_the_mesh_is_placed_whole():
    """The last validation batch (12 volumes at batch 8 leave 4 rows) on an 8-device FSDP mesh: an
    even batch is split over the batch shards, an uneven one is replicated, and jit runs on both."""
    mesh = sharding.mesh_from_spec("fsdp:-1")
    even = pipeline.to_global({"x": np.ones((8, 3), np.float32), "meta": {"n": 8}}, mesh)
    uneven = pipeline.to_global({"x": np.ones((4, 3), np.float32), "meta": {"n": 4}}, mesh)
    assert even["x"].sharding.spec == PartitionSpec(("data", "fsdp"), None) and even["meta"] == {"n": 8}
    assert uneven["x"].sharding.is_fully_replicated and uneven["x"].shape == (4, 3)
    with sharding.use_mesh(mesh):
        total = jax.jit(lambda x: sharding.constrain(x, ("batch", None)).sum(1))
        assert np.asarray(total(uneven["x"])).tolist() == [3.0] * 4
