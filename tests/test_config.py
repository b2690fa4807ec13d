import pytest

from trainables.config import CompressConfig, G2Config, TrialConfig


def test_defaults_are_the_papers():
    g2 = G2Config()
    assert (g2.gate_mode, g2.tau, g2.p, g2.sharpen_tau, g2.eval_gate) == ("g2", 0.9, 0.2, 0.2, "soft")
    assert CompressConfig().is_identity


@pytest.mark.parametrize("field, value, allowed", [
    ("gate_mode", "gru", "'lstm', 'sharpened', 'g2'"),
    ("tau", 0.0, "(0.0, 10.0]"),
    ("tau", -1.0, "(0.0, 10.0]"),
    ("tau", 11.0, "(0.0, 10.0]"),
    ("tau", float("nan"), "(0.0, 10.0]"),
    ("tau", "0.9", "(0.0, 10.0]"),
    ("p", 1.5, "[0.0, 1.0]"),
    ("p", -0.1, "[0.0, 1.0]"),
    ("sharpen_tau", 0.0, "(0.0, 10.0]"),
    ("eval_gate", "binary", "'soft', 'tempered', 'hard'"),
])
def test_g2_config_refuses_bad_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        G2Config(**{field: value})
    assert f"g2.{field}" in str(err.value)
    assert allowed in str(err.value)


@pytest.mark.parametrize("field, value, allowed", [
    ("rank", -1, "[0, 65536]"),
    ("rank", 2.5, "[0, 65536]"),
    ("rank", True, "[0, 65536]"),
    ("bits", 0, "[1, 16] or 32"),
    ("bits", 17, "[1, 16] or 32"),
    ("bits", 4.0, "[1, 16] or 32"),
    ("paper", "svd", "'none', 'round', 'round_clip'"),
    ("step", 0.0, "(0.0, 100.0]"),
    ("clip", -0.4, "(0.0, 100.0]"),
    ("paper", "rel", "'round_rel', 'round_clip_rel'"),
    ("rel_step", 0.0, "(0.0, 100.0]"),
    ("rel_clip", -2.0, "(0.0, 100.0]"),
    ("targets", "all", "'both', 'recurrent', 'input'"),
])
def test_compress_config_refuses_bad_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        CompressConfig(**{field: value})
    assert f"compress.{field}" in str(err.value)
    assert allowed in str(err.value)


def test_paper_rounding_stands_alone():
    with pytest.raises(ValueError, match="compress.paper='round' stands alone"):
        CompressConfig(paper="round", rank=8)
    with pytest.raises(ValueError, match="compress.paper='round_clip' stands alone"):
        CompressConfig(paper="round_clip", bits=4)


@pytest.mark.parametrize("cfg, label", [
    (CompressConfig(), "none"), (CompressConfig(rank=8), "svd"), (CompressConfig(bits=4), "quant"),
    (CompressConfig(rank=8, bits=4), "svd+quant"), (CompressConfig(paper="round_clip"), "round_clip"),
    (CompressConfig(paper="round_rel"), "round_rel"), (CompressConfig(paper="round_clip_rel"), "round_clip_rel"),
])
def test_method_label(cfg, label):
    assert cfg.method == label


def test_relative_rounding_is_chosen_as_the_papers_modes_are():
    """compress.paper for the trial's own setting, sweep.paper for the grid, with its relative step and clip."""
    cfg = TrialConfig.from_flat({"compress.paper": "round_clip_rel", "compress.rel_step": 0.25,
                                 "compress.rel_clip": 3, "sweep.paper": ["round", "round_rel", "round_clip_rel"]})
    assert (cfg.compress.method, cfg.compress.rel_step, cfg.compress.rel_clip) == ("round_clip_rel", 0.25, 3.0)
    grid = cfg.sweep.settings(cfg.compress)
    rounding = [s for s in grid if s.paper != "none"]
    assert [s.paper for s in rounding] == ["round", "round_rel", "round_clip_rel"]
    assert all((s.rel_step, s.rel_clip, s.rank, s.bits) == (0.25, 3.0, 0, 32) for s in rounding)
    assert cfg.to_flat()["compress.rel_step"] == 0.25
    with pytest.raises(ValueError, match="compress.paper='round_rel' stands alone"):
        CompressConfig(paper="round_rel", rank=4)
    with pytest.raises(ValueError, match=r"sweep.paper\[\] must be one of 'round', 'round_clip', 'round_rel'"):
        TrialConfig.from_flat({"sweep.paper": ["none"]})


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        G2Config().tau = 1.0


@pytest.mark.parametrize("flat, message", [
    ({"train.impl": "triton"}, "train.impl must be one of 'auto', 'reference', 'fused'"),
    ({"train.precision": "fp16"}, "train.precision must be one of 'fp32', 'bf16'"),
    ({"train.cuda_graphs": "yes"}, "train.cuda_graphs"),
    ({"train.impl": "reference", "train.precision": "bf16"}, "train.precision='bf16' runs on the fused path only"),
])
def test_execution_knobs_are_validated(flat, message):
    from trainables.config import TrialConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrialConfig.from_flat(flat)


def test_execution_knobs_keep_the_training_key_but_precision_changes_it():
    """Where and how fast a trial trains does not change its model; bf16 GEMM operands do."""
    from trainables.config import TrialConfig

    base = TrialConfig().training_key()
    assert TrialConfig.from_flat({"train.impl": "reference", "train.cuda_graphs": True}).training_key() == base
    assert TrialConfig.from_flat({"train.precision": "bf16"}).training_key() != base
