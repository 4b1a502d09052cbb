"""Stage plan: what trains at which lr, and the freeze test (only level k changes in stage k)."""
import pytest
import torch

from taxadiffusion.backbone import add_lora, build_tiny
from taxadiffusion.config import ModelConfig, TrainConfig
from taxadiffusion.conditioning import TaxonomyConditioner
from taxadiffusion.stages import apply_stage, plan_stages, select_stages

RANKS = ("class", "order", "family", "genus", "species")


def test_progressive_plan_matches_the_paper():
    plan = plan_stages(TrainConfig(), RANKS)
    assert [s.name for s in plan] == ["stage-0-class", "stage-1-order", "stage-2-family",
                                      "stage-3-genus", "stage-4-species"]
    assert plan[0].train_lora and plan[0].train_levels == (0,) and plan[0].lr == 1e-4
    for k, s in enumerate(plan[1:], 1):
        assert s.train_levels == (k,) and not s.train_lora and not s.train_unet and s.lr == 1e-5
        assert s.p_uncond == 0 and s.p_prefix == 0
    assert all(s.steps == 250_000 for s in plan)


def test_single_stage_strategies_share_the_budget():
    tc = TrainConfig(steps_per_stage=100, steps_stage0=300)
    for strat in ("all", "random", "lora-text", "full"):
        (s,) = plan_stages(TrainConfig(**{**tc.__dict__, "strategy": strat}), RANKS)
        assert s.steps == 300 + 4 * 100
    full = plan_stages(TrainConfig(strategy="full"), RANKS)[0]
    assert full.train_unet and full.lr == 1e-5 and full.text_prompt
    assert plan_stages(TrainConfig(strategy="random"), RANKS)[0].random_level
    with pytest.raises(ValueError, match="strategy"):
        plan_stages(TrainConfig(strategy="bogus"), RANKS)
    assert [s.index for s in select_stages(plan_stages(TrainConfig(), RANKS), "1,3")] == [1, 3]
    with pytest.raises(ValueError, match="do not exist"):
        select_stages(plan_stages(TrainConfig(), RANKS), "7")


def test_unet_every_stage_keeps_the_unet_training_and_reopens_the_dropped_branches():
    lora = plan_stages(TrainConfig(unet_every_stage=True, steps_per_stage=10), RANKS)
    whole = plan_stages(TrainConfig(unet_every_stage=True, train_unet_stage0=True, steps_per_stage=10),
                        RANKS)
    for k in range(1, 5):
        assert lora[k].train_lora and not lora[k].train_unet and lora[k].train_levels == (k,)
        assert whole[k].train_unet and not whole[k].train_lora and whole[k].train_levels == (k,)
        assert lora[k].p_uncond == 0.1 and lora[k].p_prefix == 0.1 and lora[k].lr == 1e-5
    mc = ModelConfig(base="tiny", level_heads=4, level_ff=128)
    bb = build_tiny(mc, 16)
    cond = TaxonomyConditioner(5, 64, 2, 4, 128, 0.1, zero_init=False)
    params = apply_stage(whole[3], bb.unet, cond)
    ids = {id(p) for p in params}
    assert all(id(p) in ids for p in bb.unet.parameters()) and bb.unet.training
    assert all(id(p) in ids for p in cond.levels[3].parameters())
    assert not any(id(p) in ids for l in (0, 1, 2, 4) for p in cond.levels[l].parameters())


def test_train_earlier_levels_keeps_levels_0_to_k_training_and_their_prefixes_on():
    paper = plan_stages(TrainConfig(train_earlier_levels=True), RANKS)
    with_unet = plan_stages(TrainConfig(train_earlier_levels=True, unet_every_stage=True), RANKS)
    for k in range(1, 5):
        assert paper[k].train_levels == with_unet[k].train_levels == tuple(range(k + 1))
        assert not paper[k].train_lora and paper[k].p_uncond == 0 and paper[k].p_prefix == 0.1
    mc = ModelConfig(base="tiny", level_heads=4, level_ff=128)
    bb = build_tiny(mc, 16)
    add_lora(bb.unet, mc)
    cond = TaxonomyConditioner(5, 64, 2, 4, 128, 0.1, zero_init=False)
    ids = {id(p) for p in apply_stage(paper[2], bb.unet, cond)}
    assert all(id(p) in ids for l in (0, 1, 2) for p in cond.levels[l].parameters())
    assert not any(id(p) in ids for l in (3, 4) for p in cond.levels[l].parameters())
    assert not any(id(p) in ids for p in bb.unet.parameters())


def _snapshot(*mods):
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(mods) for n, p in m.state_dict().items()}


def test_freeze_after_a_stage_k_step_only_level_k_changed():
    mc = ModelConfig(base="tiny", level_heads=4, level_ff=128)
    bb = build_tiny(mc, 16)
    add_lora(bb.unet, mc)
    cond = TaxonomyConditioner(5, 64, 2, 4, 128, 0.1, zero_init=False)
    stage = plan_stages(TrainConfig(), RANKS)[2]
    params = apply_stage(stage, bb.unet, cond)
    assert not bb.unet.training and not cond.levels[0].training and cond.levels[2].training
    before = _snapshot(bb.unet, cond)
    opt = torch.optim.AdamW(params, lr=1e-2)
    emb = torch.randn(2, 5, 77, 64)
    keep = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    ctx = cond(emb, keep, torch.zeros(77, 64))
    loss = bb.unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), ctx).sample.square().mean()
    loss.backward()
    opt.step()
    after = _snapshot(bb.unet, cond)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    level2 = {k for k in before if k.startswith("1.levels.2.")}
    assert changed and changed <= level2
    assert changed == {k for k in level2 if "running" not in k}  # every level-2 tensor moved


def test_zero_init_output_projection_starts_at_zero_and_gets_a_full_gradient():
    torch.manual_seed(0)
    emb, null = torch.randn(4, 3, 77, 32), torch.zeros(77, 32)
    keep0 = torch.tensor([[True, False, False]] * 4)
    keep01 = torch.tensor([[True, True, False]] * 4)
    proj = TaxonomyConditioner(3, 32, 1, 4, 64, 0.0, zero_init=True, out_proj=True)
    ln = TaxonomyConditioner(3, 32, 1, 4, 64, 0.0, zero_init=True)
    assert proj.levels[0].proj is None and proj.levels[1].proj is not None  # level 0 is the paper's
    assert sum(p.numel() for p in proj.parameters()) == sum(p.numel() for p in ln.parameters()) + 2 * (32 * 32 + 32)
    for cond in (proj, ln):
        assert torch.equal(cond(emb, keep01, null), cond(emb, keep0, null))  # level 1 adds exactly 0
        assert cond.output_gains()[1:] == [0.0, 0.0] and cond.output_gains()[0] > 0.5
        (cond(emb, keep01, null) * torch.randn(4, 77, 32)).sum().backward()
    # the projection's whole (32 x 32) map gets a gradient; the LayerNorm-gain init only a diagonal
    assert (proj.levels[1].proj.weight.grad != 0).float().mean() > 0.9
    assert ln.levels[1].encoder.layers[-1].norm2.weight.grad.ne(0).all()
    assert ln.levels[1].encoder.layers[0].linear1.weight.grad.abs().max() == 0


def test_demo_preset_trains_the_unet_in_every_stage_and_its_baseline_on_the_same_recipe():
    """configs/demo.yaml departs from the paper in three measured ways (README); the SD presets do not."""
    from taxadiffusion.config import load_config
    demo = load_config("demo")
    plan = plan_stages(demo.train, tuple(demo.data.ranks))
    assert all(s.train_unet and not s.train_lora for s in plan) and demo.train.snr_gamma == 2
    assert not demo.model.zero_init and sum(s.steps for s in plan) == 360
    (flat,) = plan_stages(load_config("demo", ["train.strategy=full"]).train, tuple(demo.data.ranks))
    assert flat.train_unet and flat.text_prompt and flat.steps == 360 and flat.lr == demo.train.lr_stage0
    sd = load_config("sd15-fishnet")
    sd_plan = plan_stages(sd.train, tuple(sd.data.ranks))
    assert sd_plan[0].train_lora and not any(s.train_unet or s.train_lora for s in sd_plan[1:])
    assert sd.train.snr_gamma is None and sd.model.zero_init
