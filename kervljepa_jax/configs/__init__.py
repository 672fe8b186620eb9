"""The four phase configs (`phaseN.get_config(arg)`), shipped with the package so that an installed
wheel runs without the source tree. The repository's top-level configs/phaseN.py re-export them:
copy a file from here over its top-level namesake to edit it, or pass any file with
`--config=PATH[:paper]`."""
