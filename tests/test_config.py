"""Config checks: every field's type and range, when a config.json is read and for presets with overrides."""
import dataclasses
import json

import pytest

from nanoqwen import cli
from nanoqwen.checkpoint import load_model, save_model
from nanoqwen.config import FIELD_RULES, PRESETS, Qwen3Config, get_preset

# (field, bad value, the words of the error after "FIELD = VALUE: must be")
BAD = [("hidden_size", "lots", "an integer >= 1"), ("num_hidden_layers", -1, "an integer >= 1"),
       ("num_attention_heads", 0, "an integer >= 1"), ("vocab_size", 2.5, "an integer >= 1"),
       ("intermediate_size", True, "an integer >= 1"), ("head_dim", 0, "an integer >= 1 or null"),
       ("tie_word_embeddings", "yes", "true or false"), ("rope_theta", 0, "a number > 0"),
       ("rms_norm_eps", -1e-6, "a number > 0"), ("max_position_embeddings", None, "an integer >= 1"),
       ("eos_token_id", [151645, "x"], "a token id (an integer >= 0), a list of them, or null"),
       ("torch_dtype", "int8", "one of float32, bfloat16, float16, or null"),
       ("model_type", "llama", "one of qwen3, qwen3_moe, qwen3_next"),
       ("partial_rotary_factor", 2, "a number in (0, 1]"), ("num_experts", -8, "an integer >= 0"),
       ("decoder_sparse_step", 0, "an integer >= 1"), ("rope_scaling", "yarn", "an object"),
       ("mlp_only_layers", "none", "a list of layer indices")]


def test_every_field_has_a_rule_and_real_configs_pass():
    """The rules cover the dataclass, every preset passes, and so does what transformers writes for each type."""
    assert set(FIELD_RULES) == {f.name for f in dataclasses.fields(Qwen3Config)}
    for name in PRESETS:
        get_preset(name)
    from transformers import Qwen3Config as HFDense, Qwen3MoeConfig as HFMoe, Qwen3NextConfig as HFNext
    for hf in (HFDense(), HFMoe(), HFNext(), HFDense(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                   "original_max_position_embeddings": 32768})):
        Qwen3Config.from_dict(json.loads(hf.to_json_string()))


@pytest.mark.parametrize("field,value,allowed", BAD, ids=[b[0] for b in BAD])
def test_a_bad_field_is_one_error_naming_it(tmp_path, field, value, allowed):
    expected = f"{field} = {json.dumps(value)}: must be {allowed}"
    (tmp_path / "config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ValueError) as error:
        Qwen3Config.from_json(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path / 'config.json'}: {expected}")
    with pytest.raises(ValueError) as error:  # the same check for a preset with overrides
        get_preset("nano-d2", **{field: value})
    assert str(error.value).startswith(expected)


def test_cross_field_checks():
    for fields, message in [
            (dict(num_attention_heads=6, num_key_value_heads=4), "must be a multiple of num_key_value_heads"),
            (dict(head_dim=None, hidden_size=8, num_attention_heads=16), "gives head_dim 0"),
            (dict(num_hidden_layers=2, mlp_only_layers=[2]), "mlp_only_layers = \\[2\\]: each must be a layer index"),
            (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling factor = None: yarn needs a number > 0"),
            (dict(bogus=1), "unknown config field\\(s\\): bogus")]:
        with pytest.raises(ValueError, match=message):
            get_preset("nano-d2", **fields)


def test_overrides_of_a_checkpoint_folder_are_checked(tmp_path):
    save_model(load_model("nano-d2", vocab_size=256), str(tmp_path))
    assert load_model(str(tmp_path), rope_theta=1e6).config.rope_theta == 1e6
    with pytest.raises(ValueError, match="rope_theta = -1: must be a number > 0"):
        load_model(str(tmp_path), rope_theta=-1)


@pytest.mark.parametrize("content,message", [
    ('[{"hidden_size": 64}]', "a config must be a JSON object of fields, got a JSON array"),
    ('{"hidden_size": "lots"}', 'hidden_size = "lots": must be an integer >= 1'),
    ('{"num_hidden_layers": -1}', "num_hidden_layers = -1: must be an integer >= 1")])
def test_a_bad_config_json_is_one_line_in_the_cli(tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(content)
    for command in (["info", str(tmp_path)], ["generate", "--model", str(tmp_path), "--prompt", "hi"]):
        with pytest.raises(SystemExit) as exit_status:
            cli.main(command)
        out = capsys.readouterr()
        assert exit_status.value.code == 2 and out.out == ""
        assert out.err == f"nanoqwen {command[0]}: error: {tmp_path / 'config.json'}: {message}\n"
