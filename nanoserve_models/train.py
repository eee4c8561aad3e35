"""Train nanoserve's embedded default model: a byte-level BPE tokenizer and a small GPT-2, on a CPU.

    python nanoserve_models/train.py --corpus nanoserve_models/tinyshakespeare.txt \
        --out nanoserve_models/shakespeare --threads 1
    python nanoserve_models/train.py --corpus some.txt --out /tmp/m --preset tiny --steps 50     # a quick look

The output folder is a Hugging Face GPT-2 checkpoint (config.json, model.safetensors, tokenizer.json), so the
same loader serves it and `transformers.GPT2LMHeadModel.from_pretrained(out)` reads it unchanged. The model
is nanoserve's own `GPT` class: what we train is exactly what the engine runs.

The last 10% of the corpus (by characters) is held out. The tokenizer and the model see only the first 90%;
the validation loss is the mean next-token loss over the whole held-out slice in non-overlapping windows,
measured on the saved (fp16) weights. training.json records it with everything else about the run.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `import nanoserve`
from nanoserve import GPT, GPTConfig, ours_to_hf  # noqa: E402

EOS = "<|endoftext|>"
PRESETS = {  # model shapes; GPT-2 small is n_layer=12, n_head=12, n_embd=768
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),  # for tests: seconds
    "small": dict(n_layer=4, n_head=4, n_embd=256),  # the shipped model: ~4M parameters, ~30 min on a busy 2-core CPU
    "medium": dict(n_layer=6, n_head=6, n_embd=384),  # ~12M parameters: about 2.5x slower per step
}


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """GPT-2's tokenizer recipe: BPE over bytes, so any text round-trips (decode(encode(s)) == s)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


@torch.no_grad()
def evaluate(model: GPT, ids: torch.Tensor, context_len: int, batch_size: int = 16) -> float:
    """Mean next-token loss over `ids` in non-overlapping windows: every token but the first predicted once."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, context_len * batch_size):
        chunk = ids[start : start + context_len * batch_size + 1]
        n = (len(chunk) - 1) // context_len  # full windows in this chunk
        xs = [chunk[:-1][: n * context_len].view(n, context_len)] if n else []
        ys = [chunk[1:][: n * context_len].view(n, context_len)] if n else []
        if len(chunk) - 1 > n * context_len:  # the shorter last window
            xs.append(chunk[n * context_len : -1][None])
            ys.append(chunk[n * context_len + 1 :][None])
        for x, y in zip(xs, ys):
            logits = model(x)  # (B, T, V)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """The baseline a model must beat: predict every token from its training-split frequency (add-one)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    return -(counts / counts.sum()).log()[val_ids[1:]].mean().item()


@torch.no_grad()
def sample(model: GPT, tok: Tokenizer, prompt: str, max_tokens=200, temperature=0.8, top_k=40, seed=0) -> str:
    """Plain top-k sampling with the dense forward (no KV cache: the engine is where that lives)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt).ids])
    for _ in range(max_tokens):
        logits = model(ids[:, -model.config.n_positions :])[0, -1] / temperature  # (V,)
        v, i = logits.topk(top_k)
        nxt = i[torch.multinomial(F.softmax(v, -1), 1, generator=gen)]
        if nxt.item() == model.config.eos_token_id:
            break
        ids = torch.cat([ids, nxt[None]], dim=1)
    model.train()
    return tok.decode(ids[0].tolist())


def add_dropout(model: GPT, p: float):
    """nanoserve's GPT has no dropout (serving never needs it); add residual dropout for training.

    A forward hook replaces each attention and MLP output with dropout(output) while model.training is True;
    the saved weights are untouched by it. With ~10 passes over a 1 MB corpus, it slows memorising.
    """
    for block in model.h:
        for m in (block.attn, block.mlp):
            m.register_forward_hook(lambda mod, inputs, out: F.dropout(out, p, mod.training))


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr / 10 + (args.lr - args.lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="any UTF-8 text file")
    p.add_argument("--out", required=True, help="folder for config.json, model.safetensors, tokenizer.json")
    p.add_argument("--preset", choices=PRESETS, default="small")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-len", type=int, default=256, help="tokens per training window (n_positions)")
    p.add_argument("--vocab-size", type=int, default=3072)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="of the saved weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)

    t_start = time.time()
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)  # tiny gradients as denormals are very slow on some CPUs
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # data: split by characters first, so the tokenizer never sees the held-out text either
    text = Path(args.corpus).read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    tok = train_tokenizer(text[:split], args.vocab_size)
    train_ids = torch.tensor(tok.encode(text[:split]).ids)
    val_ids = torch.tensor(tok.encode(text[split:]).ids)
    V = tok.get_vocab_size()
    print(f"corpus {len(text):,} chars -> {len(train_ids):,} train / {len(val_ids):,} val tokens, vocab {V}")

    shape = PRESETS[args.preset]
    cfg = GPTConfig(vocab_size=V, n_positions=args.context_len, eos_token_id=tok.token_to_id(EOS), **shape)
    model = GPT(cfg)
    add_dropout(model, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.preset} {shape}: {n_params:,} parameters")

    # AdamW; like GPT-2, no weight decay on biases and LayerNorm gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))

    gen = torch.Generator().manual_seed(args.seed)
    T, B = args.context_len, args.batch_size
    train_probe = train_ids[: 16 * T + 1]  # the train loss is measured on a fixed slice, like the val loss
    history, best = [], (float("inf"), None, 0)

    def log_eval(step):
        nonlocal best
        tr, va = evaluate(model, train_probe, T), evaluate(model, val_ids, T)
        history.append({"step": step, "train_loss": round(tr, 4), "val_loss": round(va, 4)})
        tqdm.write(f"step {step:5d}: train loss {tr:.4f}, val loss {va:.4f}")
        if va < best[0]:  # keep the best weights seen (nanoGPT does the same)
            best = (va, {k: v.clone() for k, v in model.state_dict().items()}, step)

    t_train = time.time()
    log_eval(0)
    pbar = tqdm(range(args.steps), desc="training", mininterval=5)
    for step in pbar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ix = torch.randint(len(train_ids) - T - 1, (B,), generator=gen)
        x = torch.stack([train_ids[i : i + T] for i in ix])  # (B, T)
        y = torch.stack([train_ids[i + 1 : i + T + 1] for i in ix])  # (B, T): the next tokens
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step, args):.1e}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            log_eval(step + 1)
    train_s = time.time() - t_train

    # save the best weights rounded to the storage dtype, and measure the loss of exactly those
    dtype = getattr(torch, args.dtype)
    stored = {k: v.to(dtype) for k, v in best[1].items()}
    model.load_state_dict({k: v.float() for k, v in stored.items()})
    val_loss = evaluate(model, val_ids, T)
    save_file(ours_to_hf(stored), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))

    prompt = "ROMEO:\n"
    summary = {
        "corpus": Path(args.corpus).name,
        "corpus_chars": len(text),
        "corpus_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "val_split": "last 10% of the characters",
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "vocab_size": V,
        "preset": args.preset,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "context_len": T,
        "parameters": n_params,
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "best_step": best[2],
        "val_loss": round(val_loss, 4),  # of the saved weights, upcast to fp32
        "val_loss_fp32": round(best[0], 4),  # of the same weights before rounding
        "unigram_val_loss": round(unigram_loss(train_ids, val_ids, V), 4),
        "history": history,
        "sample_prompt": prompt,
        "sample": sample(model, tok, prompt, seed=args.seed),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"val loss {val_loss:.4f} ({args.dtype} weights; unigram baseline {summary['unigram_val_loss']:.4f})")
    print(f"trained {args.steps} steps in {train_s / 60:.1f} min; wrote {out}/")
    print(f"--- sample ---\n{summary['sample']}")
    return summary


if __name__ == "__main__":
    main()
