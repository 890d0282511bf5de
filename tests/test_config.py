"""Configuration: YAML (nested or flat), CLI overrides, validation."""

import pytest

from dist_prune.cli import _overrides, _parser
from dist_prune.config import ConfigError, build_config, load_config, parse_pattern


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def cli_config(argv):
    args = _parser().parse_args(argv)
    return load_config(args.config, _overrides(args))


def test_defaults_follow_the_papers():
    config = build_config()
    p, c = config.prune, config.calibration
    assert (p.method, p.sparsity, p.pattern, p.gblm_scale, p.gblm_norm) == ("gblm", 0.5, None, 100.0, "l2")
    assert (c.nsamples, c.seqlen, c.seed) == (128, 2048, 0)
    assert (p.sparsegpt_damp, p.sparsegpt_blocksize) == (0.01, 128)


def test_yaml_nested_sections(tmp_path):
    path = write(
        tmp_path,
        """
model: /some/model
out: /some/out
prune:
  method: wanda
  sparsity: 0.6
  pattern: "4:8"
calibration:
  nsamples: 16
  seqlen: 64
  seed: 3
evaluation:
  eval_after: false
runtime:
  device: cpu
""",
    )
    config = load_config(path)
    assert config.model == "/some/model" and config.out == "/some/out"
    assert config.prune.method == "wanda" and config.prune.sparsity == 0.6
    assert config.nm == (4, 8)
    assert (config.calibration.nsamples, config.calibration.seqlen, config.calibration.seed) == (16, 64, 3)
    assert config.evaluation.eval_after is False
    assert config.runtime.device == "cpu"


def test_yaml_flat_keys(tmp_path):
    path = write(tmp_path, "method: sparsegpt\nsparsity: 0.7\nnsamples: 32\nsparsegpt_blocksize: 64\neval_windows: 4\n")
    config = load_config(path)
    assert config.prune.method == "sparsegpt" and config.prune.sparsity == 0.7
    assert config.calibration.nsamples == 32
    assert config.prune.sparsegpt_blocksize == 64
    assert config.evaluation.eval_windows == 4


def test_yaml_integer_sparsity_is_accepted_as_float(tmp_path):
    # `sparsegpt_damp: 1` is a YAML int; a float field accepts it
    config = load_config(write(tmp_path, "sparsegpt_damp: 1\n"))
    assert config.prune.sparsegpt_damp == 1


@pytest.mark.parametrize(
    "text",
    [
        "methd: wanda\n",  # typo at top level
        "prune:\n  methd: wanda\n",  # typo inside a section
        "prune:\n  nsamples: 8\n",  # a real key in the wrong section
        "calibration: 3\n",  # a section name used as a leaf
        "pruning:\n  method: wanda\n",  # unknown section
    ],
)
def test_unknown_key_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(write(tmp_path, text))


def test_cli_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "prune:\n  method: wanda\n  sparsity: 0.6\ncalibration:\n  nsamples: 16\n  seqlen: 64\n")
    config = cli_config(["prune", "--config", str(path), "--sparsity", "0.7", "--seqlen", "32", "--no-eval-after"])
    assert config.prune.sparsity == 0.7  # CLI
    assert config.calibration.seqlen == 32  # CLI
    assert config.prune.method == "wanda"  # file, not overridden
    assert config.calibration.nsamples == 16  # file
    assert config.evaluation.eval_after is False
    # and the file still wins over the defaults when the CLI says nothing
    config = cli_config(["prune", "--config", str(path)])
    assert config.prune.sparsity == 0.6 and config.evaluation.eval_after is True


def test_cli_override_of_a_boolean_back_to_true(tmp_path):
    path = write(tmp_path, "eval_after: false\noverwrite: true\n")
    config = cli_config(["prune", "--config", str(path), "--eval-after", "--no-overwrite"])
    assert config.evaluation.eval_after is True and config.runtime.overwrite is False


@pytest.mark.parametrize("sparsity", [0, 0.0, 1, 1.0, 1.5, -0.1])
def test_sparsity_out_of_range(sparsity, tmp_path):
    with pytest.raises(ConfigError, match="sparsity"):
        build_config(overrides={"sparsity": sparsity})
    with pytest.raises(ConfigError, match="sparsity"):
        load_config(write(tmp_path, f"prune:\n  sparsity: {sparsity}\n"))
    with pytest.raises(ConfigError, match="sparsity"):
        cli_config(["prune", "--sparsity", str(sparsity)])


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "abc", "2:", ":4", "2-4", "2:4:8"])
def test_bad_pattern(pattern, tmp_path):
    with pytest.raises(ConfigError, match="N:M"):
        build_config(overrides={"pattern": pattern})
    with pytest.raises(ConfigError, match="N:M"):
        load_config(write(tmp_path, f'prune:\n  pattern: "{pattern}"\n'))


@pytest.mark.parametrize("pattern,expected", [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 3 ", (1, 3)), (None, None)])
def test_good_pattern(pattern, expected):
    assert parse_pattern(pattern) == expected
    assert build_config(overrides={"pattern": pattern}).nm == expected


def test_yaml_unquoted_pattern(tmp_path):
    config = load_config(write(tmp_path, "prune:\n  method: wanda\n  pattern: 2:4\n"))
    assert config.nm == (2, 4)


@pytest.mark.parametrize(
    "text,name",
    [
        ("calibration:\n  nsamples: ten\n", "nsamples"),
        ("nsamples: 8.5\n", "nsamples"),
        ("nsamples: true\n", "nsamples"),
        ("sparsity: half\n", "sparsity"),
        ("sparsity: [0.5]\n", "sparsity"),
        ("eval_after: maybe\n", "eval_after"),
        ("method: 3\n", "method"),
        ("eval_windows: 2.0\n", "eval_windows"),
    ],
)
def test_wrong_type_in_yaml(tmp_path, text, name):
    with pytest.raises(ConfigError, match=name):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "overrides,phrase",
    [
        ({"method": "obs"}, "method"),
        ({"magnitude_scope": "column"}, "magnitude_scope"),
        ({"gblm_norm": "l3"}, "gblm_norm"),
        ({"gblm_scale": 0.0}, "gblm_scale"),
        ({"sparsegpt_damp": -1.0}, "sparsegpt_damp"),
        ({"sparsegpt_blocksize": 0}, "sparsegpt_blocksize"),
        ({"nsamples": 0}, "nsamples"),
        ({"seqlen": 1}, "seqlen"),
        ({"batch_size": -2}, "batch_size"),
        ({"eval_seqlen": 0}, "eval_seqlen"),
        ({"eval_windows": 0}, "eval_windows"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_other_values_out_of_range(overrides, phrase):
    with pytest.raises(ConfigError, match=phrase):
        build_config(overrides=overrides)


def test_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "prune: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")).prune.method == "gblm"  # empty file: defaults


def test_pattern_makes_sparsity_irrelevant():
    # with N:M the unstructured ratio is ignored, so its range is not checked
    assert build_config(overrides={"pattern": "2:4", "sparsity": 1.5}).nm == (2, 4)


def test_sparsegpt_blocksize_must_fit_pattern():
    with pytest.raises(ConfigError):
        build_config(overrides={"method": "sparsegpt", "pattern": "2:4", "sparsegpt_blocksize": 6})


def test_global_allocation_goes_with_every_importance_adaptive_with_gradient_measures_only():
    assert build_config(overrides={"method": "saap"}).structured.allocation == "global"  # saap's default
    assert build_config(overrides={"method": "flap", "allocation": "uniform"}).structured.importance == "fluctuation"
    assert build_config(overrides={"method": "saap", "importance": "element"}).structured.allocation == "global"
    with pytest.raises(ConfigError, match="allocation 'adaptive' does not go with importance 'fluctuation'"):
        build_config(overrides={"method": "flap", "allocation": "adaptive"})


def test_ratio_spread_bounds_the_adaptive_allocation_only():
    adaptive = {"method": "saap", "allocation": "adaptive"}
    assert build_config(overrides={**adaptive, "ratio_spread": 0.1}).structured.ratio_spread == 0.1
    assert build_config(overrides=adaptive).structured.ratio_spread == 0.2  # saap's default
    assert build_config(overrides={"method": "saap"}).structured.ratio_spread is None  # saap's allocation: global
    assert build_config(overrides={"method": "saap", "allocation": "uniform"}).structured.ratio_spread is None
    assert build_config(overrides={"method": "flap"}).structured.ratio_spread is None
    for method in ("flap", "saap"):
        with pytest.raises(ConfigError, match="ratio_spread bounds the adaptive allocation"):
            build_config(overrides={"method": method, "ratio_spread": 0.1})
    with pytest.raises(ConfigError, match="ratio_spread must be a positive number"):
        build_config(overrides={"method": "saap", "ratio_spread": 0.0})
