import json

import pytest

from wavenet_ae.config import Config, ModelConfig, preset


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_json_round_trip(name):
    cfg = preset(name)
    again = Config.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_paper_preset_matches_the_paper():
    m = preset("paper").model
    assert m.n_in == 39 and m.n_enc == 768 and m.n_enc_fc == 4
    assert m.hop == 320 and m.sample_rate == 16000          # 50 Hz latents
    assert m.n_latent == 64 and m.n_lc_out == 128
    assert m.dilations == [2 ** i for i in range(10)] * 2    # 2 cycles x 10 layers, 1..512
    assert m.n_skp == 256 and m.n_post == 256 and m.n_quant == 256
    assert m.jitter_prob == 0.12


def test_overrides_parse_types_and_reject_bad_keys():
    cfg = preset("tiny").with_overrides(["bottleneck=vae", "train.lr=0.5", "n_batch=3",
                                         "lc_upsample_strides=[4,4,4,5]"])
    assert cfg.model.bottleneck == "vae" and cfg.train.lr == 0.5 and cfg.data.n_batch == 3
    assert cfg.model.lc_upsample_strides == [4, 4, 4, 5]
    with pytest.raises(ValueError, match="unknown"):
        cfg.with_overrides(["no_such_key=1"])
    with pytest.raises(ValueError, match="expected int"):
        cfg.with_overrides(["n_batch=abc"])
    with pytest.raises(ValueError, match="bottleneck"):
        cfg.with_overrides(["bottleneck=gan"])


@pytest.mark.parametrize("bad, match", [
    (dict(lc_upsample_strides=[5, 4, 4], lc_upsample_kern_sizes=[5, 4, 4]), "must equal"),
    (dict(lc_upsample_kern_sizes=[10, 8, 8, 3]), "gaps"),
    (dict(delta_width=4), "odd"),
    (dict(cmvn_frames=10), "cmvn_frames=10 must be 0 \\(off\\) or odd"),
    (dict(dec_input_noise=1.0), "dec_input_noise"),
    (dict(adv_weight=-0.1), "adv_weight"),
])
def test_invalid_model_configs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad).validate()


def test_n_win_must_be_a_multiple_of_the_hop():
    cfg = preset("tiny")
    cfg.data.n_win = 1000
    with pytest.raises(ValueError, match="multiple"):
        cfg.validate()
    with pytest.raises(ValueError):
        Config.from_dict({"model": {"n_res": 1, "bogus": 2}})


def test_small_preset_has_the_papers_structure_at_a_cpu_budget():
    from wavenet_ae.model import WaveNetAE
    from wavenet_ae.rfield import encoder_layers
    from wavenet_ae.train import parse_args
    small, paper = preset("small"), preset("paper")
    m = small.model
    assert m.n_latent == 64 and m.n_enc_fc == 4 and m.dilations == paper.model.dilations
    assert [layer.name for layer in encoder_layers(m)] == [layer.name for layer in encoder_layers(paper.model)]
    assert WaveNetAE(m).receptive_field == 2047
    assert m.n_enc < paper.model.n_enc and m.n_res < paper.model.n_res        # narrower
    assert small.train.max_steps == small.train.lr_decay_steps and small.train.probe_files > 0
    assert parse_args(["--run-dir", "x", "--preset", "small", "--device", "cpu"]).preset == "small"
