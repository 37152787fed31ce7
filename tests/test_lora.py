import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from engines.lora import LoRAError, fuse_lora_file
from engines.tiny import LCM_LORA_TARGETS, TINY_LORA_RANK


def _unet_inputs(unet):
    torch.manual_seed(1)
    cfg = unet.config
    return dict(
        sample=torch.randn(1, 9, 16, 16),
        timestep=torch.tensor(499),
        encoder_hidden_states=torch.randn(1, 77, cfg.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])},
    )


@torch.no_grad()
def test_fused_unet_matches_the_unet_running_the_adapter(tiny_layout):
    """The published LCM LoRA, fused by us, gives what peft computes with the adapter attached."""
    from peft import LoraConfig, set_peft_model_state_dict

    fused = UNet2DConditionModel.from_pretrained(tiny_layout.unet).eval()
    with_adapter = UNet2DConditionModel.from_pretrained(tiny_layout.unet).eval()
    plain_output = fused(**_unet_inputs(fused)).sample
    info = fuse_lora_file(fused, tiny_layout.lcm_lora)

    with_adapter.add_adapter(LoraConfig(r=TINY_LORA_RANK, lora_alpha=TINY_LORA_RANK, target_modules=LCM_LORA_TARGETS))
    state = {}
    for key, value in load_file(tiny_layout.lcm_lora).items():
        key = key.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        state[key] = value
    result = set_peft_model_state_dict(with_adapter, state, adapter_name="default")
    assert not result.unexpected_keys

    expected = with_adapter(**_unet_inputs(with_adapter)).sample
    got = fused(**_unet_inputs(fused)).sample
    assert info.tensors_applied == info.tensors_in_file
    assert (expected - plain_output).abs().max() > 1e-3, "the LoRA must change the output for this test to mean anything"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_lora_for_another_model_is_refused(tiny_layout, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_layout.unet)
    state = load_file(tiny_layout.lcm_lora)
    state["unet.no_such_block.to_q.lora.down.weight"] = torch.zeros(4, 8)
    state["unet.no_such_block.to_q.lora.up.weight"] = torch.zeros(8, 4)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(LoRAError, match="targets 1 modules the model lacks"):
        fuse_lora_file(unet, bad)


def test_a_half_pair_is_refused(tiny_layout, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_layout.unet)
    state = load_file(tiny_layout.lcm_lora)
    state.pop(next(k for k in state if k.endswith("lora_B.weight")))
    bad = tmp_path / "half.safetensors"
    save_file(state, str(bad))
    with pytest.raises(LoRAError, match="lacks its up matrix"):
        fuse_lora_file(unet, bad)


def test_two_keys_for_the_same_tensor_are_refused_not_one_dropped(tmp_path):
    """Both spellings name lin's down matrix once the prefix is stripped: fusing either one alone is a guess."""
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.zeros_(model.lin.weight)
    path = tmp_path / "colliding.safetensors"
    save_file(
        {
            "unet.lin.lora.down.weight": torch.ones(2, 4),
            "lin.lora_A.weight": torch.full((2, 4), 100.0),
            "lin.lora_B.weight": torch.ones(4, 2),
        },
        str(path),
    )
    collision = "'lin.lora_A.weight' and 'unet.lin.lora.down.weight' both name the down tensor of lin"
    with pytest.raises(LoRAError, match=collision):
        fuse_lora_file(model, path)
    assert torch.count_nonzero(model.lin.weight) == 0, "nothing is fused from a refused file"


@pytest.mark.parametrize("size", [0, 7, 500])
def test_a_lora_file_cut_short_is_a_lora_error_naming_it(tiny_layout, tmp_path, size):
    """safetensors' own error names no file, and `training bundle` printed it as a traceback."""
    from engines.scorer import DiscriminatorError, check_discriminator_lora

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(tiny_layout.lcm_lora, "rb").read()[:size])
    with pytest.raises(LoRAError, match=f"LoRA file {cut}: not a readable safetensors file"):
        fuse_lora_file(UNet2DConditionModel.from_pretrained(tiny_layout.unet), cut)
    with pytest.raises(DiscriminatorError, match=f"discriminator LoRA file {cut}: not a readable safetensors file"):
        check_discriminator_lora(cut)
