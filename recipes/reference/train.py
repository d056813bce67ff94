#!/usr/bin/env python3
"""Train the bundled reference Qwen3-MoE from scratch on pre-tokenized text (uint16 token file).

    python recipes/reference/train.py --data .corpus/train.bin --val .corpus/heldout.bin \
        --minutes 8.5 --ckpt /tmp/ckpt --export out/model --log out/loss.csv --plot out/loss.png

* bf16 autocast over fp32 master weights; experts run through ``experts_implementation="grouped_mm"``
  (falls back to ``batched_mm``/eager if that fails its first step).
* router load-balancing loss on (``output_router_logits=True``, ``router_aux_loss_coef``).
* AdamW, linear warmup then cosine decay to 10% of the peak; the schedule runs on *time*
  (fraction of the ``--minutes`` budget used), so it fits any GPU's speed.
* resumable: ``--ckpt DIR`` holds ``state.pt`` (weights, optimizer, step, time used, RNG); a run
  started on an existing checkpoint continues it (the budget counts the time already used).
* logs step/tokens/lr/loss/aux/val loss to a CSV and plots the loss curve (matplotlib, if present).
* ``--export DIR`` writes the final model with ``save_pretrained`` (bf16 safetensors, shards of
  ``--shard-size``) plus the tokenizer from ``--tokenizer`` when given.
Runs on CPU too (slowly), which is how the tests smoke it.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

MODEL_KW = dict(
    vocab_size=8192, hidden_size=192, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=3,
    head_dim=32, intermediate_size=384, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=96,
    norm_topk_prob=True, tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.01,
    max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0, pad_token_id=0,
)


def make_config(experts_impl: str | None = "grouped_mm", **over):
    from transformers import Qwen3MoeConfig
    kw = dict(MODEL_KW, **over)
    try:
        cfg = Qwen3MoeConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    except TypeError:  # older transformers: rope_theta as a field
        cfg = Qwen3MoeConfig(rope_theta=10000.0, **kw)
    if experts_impl:
        cfg._experts_implementation = experts_impl
    return cfg


def load_tokens(path: str) -> np.ndarray:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint16)
    return np.fromfile(path, dtype=np.uint16)


def lr_at(frac: float, peak: float, warmup: float, floor: float = 0.1) -> float:
    if frac < warmup:
        return peak * max(frac, 1e-3) / warmup
    p = min(1.0, (frac - warmup) / max(1e-9, 1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def plot_csv(csv_path: Path, png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    allrows = list(csv.DictReader(open(csv_path)))
    val = [(float(r["tokens"]) / 1e6, float(r["val_loss"])) for r in allrows if r["val_loss"]]
    rows = [r for r in allrows if r["loss"]]
    if not rows:
        return
    tok = np.array([float(r["tokens"]) for r in rows]) / 1e6
    loss = np.array([float(r["loss"]) for r in rows])
    k = max(1, len(loss) // 100)
    sm = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(tok, loss, color="C0", alpha=0.25, lw=0.8)
    ax.plot(tok[k - 1:], sm, color="C0", label="train loss (LM)")
    if val:
        ax.plot(*zip(*val), "o-", color="C3", ms=3, label="held-out loss")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(max(0.0, min(sm.min(), min((v for _, v in val), default=9)) - 0.3), min(10, loss[: max(2, len(loss) // 20)].max() + 0.2) if len(loss) > 40 else None)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Brownout reference Qwen3-MoE (16.7M params, 32 experts, top-4)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="uint16 token file (.bin or .bin.gz)")
    ap.add_argument("--val", default=None, help="held-out uint16 token file for the validation loss")
    ap.add_argument("--minutes", type=float, default=8.5, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.03, help="warmup, as a fraction of the budget")
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--experts-impl", default="grouped_mm")
    ap.add_argument("--ckpt", default=None, help="checkpoint dir (resumed if it holds state.pt)")
    ap.add_argument("--ckpt-every", type=float, default=3.0, help="minutes between checkpoints")
    ap.add_argument("--val-every", type=float, default=30.0, help="seconds between validation losses")
    ap.add_argument("--log", default="loss.csv")
    ap.add_argument("--plot", default="loss.png")
    ap.add_argument("--export", default=None, help="save_pretrained dir for the final model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir copied into --export")
    ap.add_argument("--shard-size", default="15MB")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke tests)")
    args = ap.parse_args(argv)

    from transformers import Qwen3MoeForCausalLM

    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_setup = time.time()
    data = torch.from_numpy(load_tokens(args.data).astype(np.int32)).to(dev)
    val = torch.from_numpy(load_tokens(args.val).astype(np.int64)) if args.val else None
    n_tok = data.numel()
    print(f"train tokens {n_tok:,}; val tokens {0 if val is None else val.numel():,}; device {dev}"
          f" ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'})", flush=True)

    over = dict(router_aux_loss_coef=args.aux_coef)
    if args.tiny:
        over.update(num_hidden_layers=2)
    cfg = make_config(args.experts_impl, **over)
    model = Qwen3MoeForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params/1e6:.2f}M; experts impl {cfg._experts_implementation}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    step, used, tokens_seen = 0, 0.0, 0
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt and (ckpt / "state.pt").exists():
        st = torch.load(ckpt / "state.pt", map_location=dev, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, used, tokens_seen = st["step"], st["used"], st["tokens"]
        gen.set_state(st["gen"].cpu() if dev.type != "cuda" else st["gen"].cpu())
        print(f"resumed at step {step}, {used/60:.2f} min used, {tokens_seen/1e6:.1f}M tokens", flush=True)

    def save_ckpt():
        if not ckpt:
            return
        ckpt.mkdir(parents=True, exist_ok=True)
        tmp = ckpt / "state.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "used": used,
                    "tokens": tokens_seen, "gen": gen.get_state(), "args": vars(args)}, tmp)
        os.replace(tmp, ckpt / "state.pt")

    B, T = args.batch, args.seq
    ar = torch.arange(T + 1, device=dev)

    def batch():
        off = torch.randint(0, n_tok - T - 1, (B,), device=dev, generator=gen)
        x = data[off[:, None] + ar].long()
        return x

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def fwd(x):
        with autocast:
            out = model(input_ids=x[:, :-1],
                        output_router_logits=True, use_cache=False)
        logits = out.logits.float()
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        aux = out.aux_loss if getattr(out, "aux_loss", None) is not None else torch.zeros((), device=dev)
        return lm, aux.float()

    @torch.no_grad()
    def val_loss():
        if val is None:
            return None
        model.eval()
        nwin = min(256, (val.numel() - 1) // (T + 1))
        w = val[: nwin * (T + 1)].view(nwin, T + 1).to(dev)
        tot = 0.0
        for i in range(0, nwin, B):
            lm, _ = fwd(w[i:i + B])
            tot += lm.item() * w[i:i + B].size(0)
        model.train()
        return tot / nwin

    # first step doubles as a check that the experts implementation runs fwd+bwd here
    model.train()
    for impl in [args.experts_impl, "batched_mm", "eager"]:
        try:
            if impl != cfg._experts_implementation:
                model.set_experts_implementation(impl)
                print(f"falling back to experts implementation {impl}", flush=True)
            lm, aux = fwd(batch())
            (lm + args.aux_coef * aux).backward()
            opt.zero_grad(set_to_none=True)
            break
        except Exception as e:  # noqa: BLE001
            print(f"experts implementation {impl} failed: {type(e).__name__}: {e}", flush=True)
            opt.zero_grad(set_to_none=True)
    else:
        raise SystemExit("no experts implementation works")

    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    new_log = not (log_path.exists() and step > 0)
    logf = open(log_path, "w" if new_log else "a", newline="")
    wr = csv.writer(logf)
    if new_log:
        wr.writerow(["step", "tokens", "minutes", "lr", "loss", "aux_loss", "val_loss", "tok_per_s"])
    budget = args.minutes * 60
    print(f"setup {time.time() - t_setup:.1f}s; budget {args.minutes} min", flush=True)
    t0 = time.time() - used
    last_val, last_ckpt, t_win, tok_win = time.time() - 1e9, time.time(), time.time(), 0
    if step == 0:
        v = val_loss()
        wr.writerow([0, 0, 0.0, 0.0, "", "", f"{v:.4f}" if v is not None else "", ""])
        print(f"step 0 val {v}", flush=True)
    while True:
        used = time.time() - t0
        frac = used / budget
        if frac >= 1 or (args.max_steps is not None and step >= args.max_steps):
            break
        lr = lr_at(frac, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        lm, aux = fwd(batch())
        (lm + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += B * T
        tok_win += B * T
        if step % 25 == 0 or step == 1:
            lm_v, aux_v = lm.item(), aux.item()
            now = time.time()
            tps = tok_win / max(1e-9, now - t_win)
            t_win, tok_win = now, 0
            v = None
            if now - last_val >= args.val_every:
                v, last_val = val_loss(), time.time()
            wr.writerow([step, tokens_seen, f"{(now - t0) / 60:.3f}", f"{lr:.3e}", f"{lm_v:.4f}", f"{aux_v:.4f}",
                         f"{v:.4f}" if v is not None else "", f"{tps:.0f}"])
            logf.flush()
            if step % 200 == 0 or v is not None:
                print(f"step {step} tok {tokens_seen/1e6:.1f}M {(now - t0)/60:.2f}min lr {lr:.2e} loss {lm_v:.3f} "
                      f"aux {aux_v:.3f} val {v if v is None else round(v, 3)} {tps/1e3:.0f}k tok/s", flush=True)
            if ckpt and now - last_ckpt >= args.ckpt_every * 60:
                save_ckpt()
                last_ckpt = time.time()
    used = time.time() - t0
    v = val_loss()
    wr.writerow([step, tokens_seen, f"{used / 60:.3f}", "", f"{lm.item():.4f}", f"{aux.item():.4f}",
                 f"{v:.4f}" if v is not None else "", ""])
    logf.close()
    save_ckpt()
    summary = {"steps": step, "tokens_seen": tokens_seen, "minutes": used / 60, "final_train_loss": lm.item(),
               "final_val_loss": v, "params": n_params, "experts_impl": cfg._experts_implementation,
               "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "epochs": tokens_seen / n_tok}
    print("SUMMARY " + json.dumps(summary), flush=True)
    (log_path.parent / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_csv(log_path, Path(args.plot))
    if args.export:
        export(model, Path(args.export), args.shard_size, args.tokenizer)


def export(model, out: Path, shard_size: str, tokenizer: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", dtype=torch.bfloat16)
    model.config.output_router_logits = False  # inference default; training sets it explicitly
    model.save_pretrained(str(out), max_shard_size=shard_size, safe_serialization=True)
    if tokenizer:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(out))
    print("exported", sorted(p.name for p in out.iterdir()), flush=True)


if __name__ == "__main__":
    main()
