"""What the command-line entry points share: a user mistake ends in one line on stderr and a
non-zero exit, never a traceback from flag parsing.

ml_collections' config_flags applies `--config.a.b=v` while the flags are parsed, so a field that
does not exist surfaces there as a KeyError/AttributeError, before `main` could catch it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

from absl import flags


def program_name() -> str:
    """'train' for `python -m kervljepa_jax.train`, 'evaluate' for evaluate, ..."""
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "kervljepa_jax"


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def bad_config_field(prog: str, argv: list[str], error: Exception) -> NoReturn:
    """One line naming the `--config.a.b` flag whose field does not exist."""
    missing = str(error).strip("\"'")
    names = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = next((n for n in names if missing in n.split(".")), names[0] if names else "--config")
    fail(prog, f"{bad}: no field {missing!r} in the config; see the phase's configs/phaseN.py", 2)


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """An `app.run(..., flags_parser=...)` that turns flag and config-field errors into one line."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(prog, f"{str(e).splitlines()[0]} (see --helpfull)", 2)
        except (KeyError, AttributeError) as e:
            bad_config_field(prog, argv, e)
    return parse
