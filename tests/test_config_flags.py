"""Issue 13, kind 10: one parser for every boolean key of every config.

``--amp false`` reaches a config as the string ``'false'``, which Python calls true. Every boolean key of every
config (a top-level key whose default is true/false, plus ``use_rem`` that refdrn's evaluate.json derives from
``--method``) goes through ``scripts.common.config_flag`` (``monai.utils.str2bool``) in exactly one config entry, and
nothing reads the raw key. Each key is parsed with the values a command line or a Python caller produces, with CUDA
forced available (``torch.cuda.is_available`` patched while only parsing), so ``use_amp`` shows the flag itself.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from monai.bundle import ConfigParser

from tests.helpers import BUNDLES, load_bundle_scripts

CONFIG_SETS = {
    bundle: [
        ["inference.json"],
        ["train.json"],
        ["train.json", "evaluate.json"],
        ["train.json", "multi_gpu_train.json"],
    ]
    for bundle in ("rem_sr", "refdrn", "f3rnet_ct_mri")
}
# keys whose default is an expression but which a user may set to true/false
DERIVED_BOOLEAN_KEYS = ("use_rem",)
VALUES = [
    (True, True),
    (False, False),
    ("true", True),
    ("false", False),
    ("0", False),
    ("1", True),
    (0, False),
    (1, True),
    ("True", True),
    ("FALSE", False),
    (" yes ", True),
    ("no", False),
]
# what else each flag decides, parsed with CUDA forced available: (config id, value for the flag -> expected)
CONSUMERS = {
    "amp": [("use_amp", lambda v, flag: v is flag)],
    "zoom_augmentation": [("use_zoom_augmentation", lambda v, flag: v is flag)],
    "intensity_augmentation": [("use_intensity_augmentation", lambda v, flag: v is flag)],
    "use_rem": [("rem", lambda v, flag: (v is not None) is flag)],
    "warmup": [("evaluate#evaluator#iteration_update", lambda v, flag: v.warmup is flag)],
}


def _parser(bundle: str, configs: list[str], **overrides) -> ConfigParser:
    load_bundle_scripts(bundle, "common")  # this bundle's `scripts` first on sys.path
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    return parser


def _ids(config, prefix=""):
    """(id, value) of every node of a config."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        cid = f"{prefix}{key}"
        yield cid, value
        yield from _ids(value, cid + "#")


def boolean_keys(bundle: str, configs: list[str]) -> list[str]:
    config = _parser(bundle, configs).get()
    keys = [k for k, v in config.items() if isinstance(v, bool)]
    return keys + [k for k in DERIVED_BOOLEAN_KEYS if k in config and k not in keys]


def flag_entries(config: dict, key: str) -> list[str]:
    """The ids of the ``config_flag`` entries that parse `key`."""
    return [
        cid
        for cid, value in _ids(config)
        if isinstance(value, dict)
        and str(value.get("_target_", "")).endswith("config_flag")
        and value.get("value") == f"@{key}"
    ]


CASES = [
    (bundle, configs, key)
    for bundle, sets in CONFIG_SETS.items()
    for configs in sets
    for key in boolean_keys(bundle, configs)
]


def test_every_bundle_has_boolean_keys_found():
    found = {(b, k) for b, _, k in CASES}
    assert {("rem_sr", "amp"), ("rem_sr", "zoom_augmentation"), ("rem_sr", "intensity_augmentation")} <= found
    assert {("refdrn", "amp"), ("refdrn", "use_rem"), ("f3rnet_ct_mri", "amp"), ("f3rnet_ct_mri", "warmup")} <= found


@pytest.mark.parametrize("bundle,configs,key", CASES, ids=lambda x: "+".join(x) if isinstance(x, list) else str(x))
def test_boolean_key_goes_through_config_flag_only(bundle, configs, key):
    config = _parser(bundle, configs).get()
    entries = flag_entries(config, key)
    assert len(entries) == 1, f"{bundle} {configs}: {key} is parsed by {entries or 'no config_flag entry'}"
    text = json.dumps({k: v for k, v in config.items() if k != entries[0].split("#")[0]})
    raw = re.findall(rf"@{key}(?![A-Za-z0-9_#])", text)
    assert not raw, f"{bundle} {configs}: @{key} is read outside its config_flag entry {entries[0]}"


@pytest.mark.parametrize("bundle,configs,key", CASES, ids=lambda x: "+".join(x) if isinstance(x, list) else str(x))
def test_boolean_key_parses_every_spelling_with_cuda_forced_available(bundle, configs, key, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parsing only: nothing runs on a device
    for value, expected in VALUES:
        parser = _parser(bundle, configs, **{key: value})
        (entry,) = flag_entries(parser.get(), key)
        assert parser.get_parsed_content(entry) is expected, (key, value)
        for consumer, check in CONSUMERS.get(key, []):
            if consumer in parser:
                assert check(parser.get_parsed_content(consumer), expected), (key, value, consumer)


@pytest.mark.parametrize("bundle,configs,key", CASES, ids=lambda x: "+".join(x) if isinstance(x, list) else str(x))
def test_invalid_boolean_value_is_one_clear_error(bundle, configs, key):
    bundle_input_error = load_bundle_scripts(bundle, "common").BundleInputError
    for value in ("maybe", 2):
        parser = _parser(bundle, configs, **{key: value})
        (entry,) = flag_entries(parser.get(), key)
        with pytest.raises(Exception) as err:
            parser.get_parsed_content(entry)
        exc = err.value
        while exc is not None and not isinstance(exc, bundle_input_error):
            exc = exc.__cause__ or exc.__context__
        assert exc is not None and str(exc) == f"{key} must be true or false, got {value!r}"


def test_amp_false_string_is_false_in_the_issue_example(monkeypatch):
    """The issue's example: ``--amp false`` on rem_sr and refdrn was the truthy string 'false'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bundle in ("rem_sr", "refdrn"):
        assert _parser(bundle, ["inference.json"], amp="false").get_parsed_content("use_amp") is False
        assert _parser(bundle, ["inference.json"], amp="true").get_parsed_content("use_amp") is True
