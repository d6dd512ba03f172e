"""Training and inference throughput of polymodal's CLIP against transformers' CLIPModel.

Both models have the identical architecture (a ViT image tower and a causal text Transformer
as CLIP's, built from one CLIP config) and the same weights; they get the same inputs. Timings
are interleaved (A, B, A, B, ...) in one process and reported as medians; peak memory is
measured in a fresh process per model and mode, as the peak a step reaches above what the
process already held after one warm-up step (CPU: peak RSS, reset through
/proc/self/clear_refs; CUDA: peak allocated). FLOP
utilisation is the model's counted FLOPs per second over a fp32 matmul peak measured in the
same run.

    python benchmarks/embed_throughput.py [--batch 128] [--repeats 7] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time

import torch

VISION = dict(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
              num_attention_heads=4, hidden_act="quick_gelu")
TEXT = dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, hidden_act="quick_gelu", pad_token_id=0, bos_token_id=1, eos_token_id=2)
TOKENS = 32


def build(device: str):
    from transformers import CLIPConfig, CLIPModel

    from polymodal.models.clip import ContrastiveConfig, ContrastiveModel
    from polymodal.models.hf_clip import clip_towers, convert_state_dict

    torch.manual_seed(0)
    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=256)
    config._attn_implementation = "sdpa"
    hf = CLIPModel(config).to(device)
    ours = ContrastiveModel(ContrastiveConfig(towers=clip_towers(VISION | {"layer_norm_eps": 1e-5}, TEXT), embed_dim=256),
                            tokenizer=_VocabOnly())
    ours.load_state_dict(convert_state_dict(hf.state_dict(), VISION["num_hidden_layers"], TEXT["num_hidden_layers"]))
    return hf, ours.to(device)


class _VocabOnly:  # the benchmark feeds token ids directly
    vocab_size = TEXT["vocab_size"]


def inputs(batch: int, device: str):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, 64, 64, generator=g)
    lengths = torch.randint(8, TOKENS, (batch,), generator=g)
    ids = torch.randint(3, TEXT["vocab_size"], (batch, TOKENS), generator=g)
    mask = torch.arange(TOKENS)[None] < lengths[:, None]
    ids[torch.arange(batch), lengths - 1] = TEXT["eos_token_id"]  # end of text ends each caption
    ids[~mask] = 0
    return pixels.to(device), ids.to(device), mask.to(device)


def steps(hf, ours, batch: int, device: str):
    pixels, ids, mask = inputs(batch, device)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def train_hf():
        out = hf(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels, return_loss=True)
        opt_hf.zero_grad(set_to_none=True)
        out.loss.backward()
        opt_hf.step()

    def train_ours():
        out = ours.loss({"image": pixels, "text_ids": ids, "text_mask": mask})
        opt_ours.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt_ours.step()

    @torch.no_grad()
    def infer_hf():
        hf.get_image_features(pixel_values=pixels)

    @torch.no_grad()
    def infer_ours():
        ours.embed("image", {"image": pixels})

    return {"train": (train_ours, train_hf), "infer": (infer_ours, infer_hf)}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: str, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _memory_child(which: str, mode: str, batch: int, device: str, queue) -> None:
    hf, ours = build(device)
    fn = steps(hf, ours, batch, device)[mode][0 if which == "polymodal" else 1]
    fn()  # first step allocates optimiser state and caches
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (Linux)
            f.write("5")
        base = _status_kb("VmRSS") * 1024
    for _ in range(3):
        fn()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
    queue.put((peak - base) / 2**20)  # memory a step needs above what is already held


def peak_memory_mb(which: str, mode: str, batch: int, device: str) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(which, mode, batch, device, queue))
    p.start()
    value = queue.get()
    p.join()
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    hf, ours = build(args.device)
    fns = steps(hf, ours, args.batch, args.device)
    peak = matmul_peak(args.device)
    report = {"device": args.device, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "batch": args.batch, "matmul_peak_gflops": peak / 1e9}
    for mode, (mine, theirs) in fns.items():
        for _ in range(2):  # warm up
            mine(), theirs()
        t_mine, t_theirs = [], []
        for _ in range(args.repeats):
            t_mine.append(timed(mine, args.device))
            t_theirs.append(timed(theirs, args.device))
        m, t = statistics.median(t_mine), statistics.median(t_theirs)
        flops = counted_flops(mine)
        report[mode] = {
            "polymodal_samples_per_s": args.batch / m, "transformers_samples_per_s": args.batch / t,
            "ratio": t / m, "polymodal_flop_utilisation": flops / m / peak,
            "transformers_flop_utilisation": counted_flops(theirs) / t / peak,
            "polymodal_peak_mb": peak_memory_mb("polymodal", mode, args.batch, args.device),
            "transformers_peak_mb": peak_memory_mb("transformers", mode, args.batch, args.device),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
