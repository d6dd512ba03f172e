import math

import pytest
import torch

from polymodal.nn.diffusion import (
    Diffusion,
    DiffusionConfig,
    Guidance,
    check_guidance_interval,
)
from polymodal.nn.dit import DiT, DiTConfig
from polymodal.nn.unet import SpatialTransformer, UNet, UNetConfig, position_code


def test_linear_schedule_is_ddpm_formula():
    d = Diffusion(DiffusionConfig(schedule="linear", train_steps=1000))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0).float()
    assert torch.allclose(d.alphas_cumprod, expected, rtol=1e-5, atol=1e-7)


def test_cosine_schedule_is_improved_ddpm_formula():
    t_steps, s = 1000, 0.008
    d = Diffusion(DiffusionConfig(schedule="cosine", train_steps=t_steps))

    def f(t):
        return math.cos((t / t_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(t_steps)], dtype=torch.float64)
    expected = torch.cumprod(1 - betas, 0).float()
    assert torch.allclose(d.alphas_cumprod, expected, rtol=1e-4, atol=1e-8)
    # the cosine schedule destroys information more slowly in the middle than the linear one
    linear = Diffusion(DiffusionConfig(schedule="linear"))
    assert d.alphas_cumprod[500] > linear.alphas_cumprod[500]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_targets_recover_the_clean_sample(prediction):
    d = Diffusion(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    x_t = d.add_noise(x0, noise, t)
    a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    target = d.target(x0, noise, t)
    if prediction == "v":
        assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.allclose(d.predict_x0(target, x_t, t)[:5], x0[:5], atol=1e-3)  # t=999 is all noise
    assert d.loss(target, x0, noise, t).item() < 1e-10
    assert d.loss(target + 0.1, x0, noise, t).item() > 1e-4


def test_min_snr_weights():
    t = torch.tensor([1, 300, 999])
    for prediction in ("epsilon", "v"):
        d = Diffusion(DiffusionConfig(prediction=prediction, weighting="min_snr", min_snr_gamma=5.0))
        snr = d.snr(t)
        expected = snr.clamp(max=5.0) / (snr + 1 if prediction == "v" else snr)
        assert torch.allclose(d.weight(t), expected)
        assert d.weight(t)[0] < 1.0  # nearly noiseless steps are weighted down
    assert torch.equal(Diffusion(DiffusionConfig(weighting="none")).weight(t), torch.ones(3))
    plus = Diffusion(DiffusionConfig(prediction="v", weighting="min_snr_plus_one", min_snr_gamma=5.0))
    snr = plus.snr(t)
    assert torch.allclose(plus.weight(t), (snr.clamp(max=5.0) + 1) / (snr + 1))
    assert plus.weight(t)[2] > 0.99  # pure noise keeps full weight (plain min_snr gives it ~0)
    assert Diffusion(DiffusionConfig(prediction="v", weighting="min_snr")).weight(t)[2] < 1e-3


def test_training_timesteps_keep_their_caps_and_logit_normal_favours_the_middle():
    n = 20_000
    caps = torch.tensor([999, 500]).repeat(n // 2)
    uniform = Diffusion(DiffusionConfig())
    # uniform under caps: the fraction of each cap, as drawn before caps could be passed
    t = uniform.sample_timesteps(n, generator=torch.Generator().manual_seed(0), cap=caps)
    expected = (torch.rand(n, generator=torch.Generator().manual_seed(0)) * (caps + 1)).long()
    assert torch.equal(t, expected)
    middle = Diffusion(DiffusionConfig(timesteps="logit_normal"))
    for cap in (caps, 999):
        t = middle.sample_timesteps(n, generator=torch.Generator().manual_seed(1), cap=cap)
        assert t.dtype == torch.long and t.min() >= 0 and bool((t <= cap).all())
    t = middle.sample_timesteps(n, generator=torch.Generator().manual_seed(2))
    assert t.max() <= 999
    inner = ((t >= 250) & (t < 750)).float().mean()  # sigmoid(z) in [1/4, 3/4]: |z| < ln 3, 0.73 of a normal
    assert 0.70 < inner < 0.76  # uniform: 0.50
    assert abs(t.float().mean() - 499.5) < 10  # symmetric about the middle
    with pytest.raises(ValueError, match="timesteps"):
        DiffusionConfig(timesteps="beta")


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_with_an_oracle_denoiser_lands_on_the_data(method):
    """With a denoiser that knows the answer (one clean sample), the sampler must end on it."""
    d = Diffusion(DiffusionConfig(prediction="v", clip_sample=False))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(1)
    scheduler = d.sampler(method, 25)
    assert len(scheduler.timesteps) == 25 and int(scheduler.timesteps[0]) == 999  # starts from pure noise
    x = torch.randn(x0.shape, generator=g)
    for t in scheduler.timesteps:
        tt = torch.full((2,), int(t))
        a = d.alphas_cumprod[tt].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        x = scheduler.step(v, t, x, generator=g).prev_sample
    assert torch.allclose(x, x0, atol=2e-2)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="sigmoid")
    with pytest.raises(ValueError, match="sampler"):
        Diffusion(DiffusionConfig()).sampler("euler", 10)
    with pytest.raises(ValueError, match="steps"):
        Diffusion(DiffusionConfig()).sampler("ddim", 0)


def _inputs(b=2, side=16, channels=3, dim=24):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, channels, side, side, generator=g), torch.tensor([3, 700][:b]),
            torch.randn(b, 5, dim, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:b], dtype=torch.bool),
            torch.randn(b, dim, generator=g))


@pytest.mark.parametrize("build", [
    lambda: UNet(UNetConfig(channels=(16, 32), attention=(False, True), heads=2, groups=4, context_dim=24)),
    lambda: UNet(UNetConfig(channels=(16, 32, 32), attention=(True, False, True), heads=2, groups=4, context_dim=24,
                            patch=2)),
    lambda: UNet(UNetConfig(channels=(16, 32), attention=("cross", True), heads=2, groups=4, context_dim=24)),
    lambda: DiT(DiTConfig(width=32, depth=2, heads=2, context_dim=24, patch=2)),
], ids=["unet", "unet-patch2", "unet-cross-only", "dit"])
def test_denoisers_start_at_zero_and_learn(build):
    torch.manual_seed(0)
    denoiser = build()
    x, t, ctx, mask, pooled = _inputs()
    out = denoiser(x, t, ctx, mask, pooled)
    assert out.shape == x.shape
    assert out.abs().max().item() == 0.0  # zero-initialised output: starts by predicting nothing
    opt = torch.optim.AdamW(denoiser.parameters(), 2e-3)
    target = torch.randn_like(x)
    first = None
    for _ in range(40):
        loss = (denoiser(x, t, ctx, mask, pooled) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    # the text matters: changing the context changes the output
    assert not torch.allclose(denoiser(x, t, ctx, mask, pooled), denoiser(x, t, ctx + 1.0, mask, pooled))
    # masked context tokens do not
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0
    assert torch.allclose(denoiser(x, t, ctx, mask, pooled)[0], denoiser(x, t, ctx2, mask, pooled)[0], atol=1e-5)


def test_denoisers_reject_sizes_they_cannot_take():
    x, t, ctx, mask, pooled = _inputs(side=9)
    with pytest.raises(ValueError, match="divisible"):
        UNet(UNetConfig(channels=(16, 32), attention=(False, True), groups=4, context_dim=24))(x, t, ctx, mask, pooled)
    with pytest.raises(ValueError, match="divisible"):
        DiT(DiTConfig(width=32, depth=1, heads=2, context_dim=24, patch=4))(x, t, ctx, mask, pooled)
    with pytest.raises(ValueError, match="attention"):
        UNetConfig(channels=(16, 32), attention=(True,))
    with pytest.raises(ValueError, match="'both'"):
        UNetConfig(channels=(16, 32), attention=(False, "both"))


@pytest.mark.parametrize("pooled_text", [True, False])
def test_unet_reads_pooled_text_only_when_asked(pooled_text):
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(16, 32), attention=(False, True), heads=2, groups=4, context_dim=24,
                           pooled_text=pooled_text))
    for p in unet.parameters():  # zero-initialised layers (output, conditioning) would hide the path
        torch.nn.init.normal_(p, std=0.1)
    x, t, ctx, mask, pooled = _inputs()
    same = torch.allclose(unet(x, t, ctx, mask, pooled), unet(x, t, ctx, mask, pooled + 1.0))
    assert same != pooled_text
    assert (unet.text_to_cond is not None) == pooled_text


@pytest.mark.parametrize("positions", [True, False])
def test_attention_blocks_know_where_they_are(positions):
    """A uniform map through a spatial Transformer stays uniform unless positions are coded in."""
    torch.manual_seed(0)
    block = SpatialTransformer(16, 2, context_dim=24, groups=4, positions=positions)
    torch.nn.init.normal_(block.proj_out.weight)  # the output projection starts at zero
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 8, 8).contiguous()
    _, _, ctx, mask, _ = _inputs(b=1)
    out = block(x, ctx, mask)
    spread = (out - out.mean((2, 3), keepdim=True)).abs().max().item()
    assert (spread > 1e-2) if positions else (spread < 1e-5)
    code = position_code(8, 8, 16, torch.device("cpu"))
    assert code.shape == (64, 16)
    assert len({tuple(row.tolist()) for row in code.round(decimals=4)}) == 64  # every position its own code


def test_a_guidance_interval_guides_only_the_timesteps_inside_it():
    assert check_guidance_interval(None) is None
    assert check_guidance_interval("0, 500") == (0, 500) and check_guidance_interval((10, 10)) == (10, 10)
    steps = (999, 501, 500, 300, 100, 99, 0)
    assert [Guidance.of(3.0, (100, 500)).at(t) for t in steps] == [1, 1, 3, 3, 3, 1, 1]
    assert [Guidance.of(4.0, "100,500", outside=1.5).at(t) for t in steps] == [1.5, 1.5, 4, 4, 4, 1.5, 1.5]
    assert Guidance.of(3.0).at(torch.tensor(999)) == 3.0  # no interval: every step
    assert Guidance.of(3.0).active and not Guidance.of(1.0).active and not Guidance.of(1.0, (0, 500)).active
    assert Guidance.of(1.0, (0, 500), outside=2.0).active  # guided outside the interval only
    with pytest.raises(ValueError, match="needs the interval"):
        Guidance.of(3.0, None, outside=1.5)
    for bad, match in (("500,0", "low <= high"), ("0,1000", "< 1000"), ("-1,5", "0 <= low"), ("a,b", "LOW,HIGH"),
                       ("1,2,3", "two whole"), ((0.5, 3), "whole")):
        with pytest.raises(ValueError, match=match):
            check_guidance_interval(bad)
    assert check_guidance_interval("0,99", train_steps=100) == (0, 99)
    with pytest.raises(ValueError, match="< 100"):
        check_guidance_interval("0,100", train_steps=100)
