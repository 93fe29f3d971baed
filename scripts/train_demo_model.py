"""Train the demo model shipped as "moe-hooked/demo" (`moe_hooked/assets/demo_model/`).

A small DeepSeekMoE (layer 0 a dense SwiGLU MLP; then MoE layers with an ungated shared
expert of width n_shared_experts * d_expert and 16 routed experts, top-4), built with the
package's own `HookedMoETransformer`, trained on CPU from scratch with its own byte-level
BPE tokenizer on:

- the texts of `--data` (default `../shared/data/domains/*.txt`, one sample per line), the
  last `--held-out` samples of each file kept aside for evaluation;
- the package's built-in sample corpora (`moe_hooked/assets/corpora/`), plus
  `--generated-samples` more per domain drawn from the same generators
  (`scripts/make_sample_corpora.py`) with another seed.

Training: AdamW, linear warm-up then cosine decay, gradient clipping, a Switch-Transformer
load-balancing loss read from `hook_router_probs` / `hook_topk_indices` through hooks, fixed
seeds and a seeded data order. It prints the loss curve and the final held-out perplexity
per domain, then rounds the weights to bfloat16 (the checkpoint's storage dtype; config.json
keeps float32 as the dtype to run in), reports the held-out perplexity of that rounded model,
saves it in the real DeepSeekMoE hub layout (config.json, model.safetensors with per-expert keys,
tokenizer files) and checks that `HookedMoETransformer.from_pretrained` loads it back with
identical logits.

    python scripts/train_demo_model.py     # ~70 min on one core of a 2-core machine
    python scripts/train_demo_model.py --steps 20 --out /tmp/demo   # a quick smoke run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch.optim.lr_scheduler import LambdaLR
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moe_hooked import HookedMoETransformer, MoEConfig
from make_sample_corpora import generate as generate_sample_corpora
from moe_hooked.data import builtin_corpora, iter_token_batches, load_texts
from moe_hooked.loading.export import save_hub_checkpoint

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
BUILTIN_PREFIX = "builtin-"
GENERATED_SEED = 7_000_000


# ------------------------------------------------------------------------------------- data
def read_domains(
    data_dir: Path, n_held_out: int, n_generated: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, held_out) samples per domain: each `*.txt` of `data_dir` split at its last
    `n_held_out` samples, plus (training only) the built-in corpora and `n_generated` more
    samples per built-in domain from their generators, as `builtin-<name>`."""
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt corpora in {data_dir}: pass --data pointing at the domain texts")
    texts = {path.stem: load_texts(path) for path in files}
    short = [name for name, samples in texts.items() if len(samples) <= n_held_out]
    if short:
        raise ValueError(f"{short} have at most {n_held_out} samples: nothing would be left to train on")
    train = {name: samples[:-n_held_out] for name, samples in texts.items()}
    held_out = {name: samples[-n_held_out:] for name, samples in texts.items()}
    generated = generate_sample_corpora(GENERATED_SEED, n_generated) if n_generated else {}
    for name, samples in builtin_corpora().items():
        train[BUILTIN_PREFIX + name] = samples + generated.get(name, "").splitlines()
    return train, held_out


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; ids 0, 1, 2 are <pad>, <bos>, <eos>, and encoding with
    special tokens prepends <bos> (as DeepSeek's tokenizer does)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def token_streams(tokenizer, corpora: dict[str, list[str]]) -> dict[str, Int[torch.Tensor, " n"]]:
    """Each domain's samples tokenised and concatenated, each followed by <eos>."""
    streams = {}
    for name, texts in corpora.items():
        ids = [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]]
        streams[name] = torch.tensor(ids, dtype=torch.long)
    return streams


class WindowSampler:
    """Seeded random training windows: <bos> followed by n_ctx - 1 consecutive ids of one stream,
    the stream drawn in proportion to its length (so every token is equally likely)."""

    def __init__(self, streams: dict[str, torch.Tensor], n_ctx: int, bos: int, seed: int):
        too_short = [name for name, s in streams.items() if len(s) < n_ctx]
        if too_short:
            raise ValueError(f"streams {too_short} are shorter than n_ctx={n_ctx}")
        self.streams = list(streams.values())
        self.weights = torch.tensor([len(s) for s in self.streams], dtype=torch.float)
        self.n_ctx, self.bos = n_ctx, bos
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int) -> Int[torch.Tensor, "batch n_ctx"]:
        which = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.generator)
        rows = []
        for i in which.tolist():
            stream = self.streams[i]
            start = int(torch.randint(0, len(stream) - self.n_ctx + 2, (1,), generator=self.generator))
            rows.append(torch.cat([torch.tensor([self.bos]), stream[start : start + self.n_ctx - 1]]))
        return torch.stack(rows)


# ------------------------------------------------------------------------------------ model
def demo_config(args, tokenizer) -> MoEConfig:
    """DeepSeekMoE as `moe_hooked.loading.deepseek` translates it: dense layer 0, MoE layers
    1.. with an ungated shared expert, router softmax in the model dtype, no renormalisation."""
    return MoEConfig(
        architecture="deepseek",
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_key_value_heads=args.n_heads,
        d_head=args.d_model // args.n_heads,
        d_vocab=len(tokenizer),
        n_ctx=args.n_ctx,
        n_experts=args.n_experts,
        top_k=args.top_k,
        d_expert=args.d_expert,
        moe_layers=tuple(range(1, args.n_layers)),
        d_mlp=args.d_mlp,
        norm_topk_prob=False,
        norm_topk_eps=1e-20,
        router_dtype="model",
        d_shared_expert=args.n_shared_experts * args.d_expert,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        default_prepend_bos=True,
    )


def hub_config(cfg: MoEConfig, aux_loss_alpha: float) -> dict:
    """The DeepSeekMoE config.json (the field names of deepseek-ai/deepseek-moe-16b-base) of `cfg`."""
    return {
        "architectures": ["DeepseekForCausalLM"],
        "model_type": "deepseek",
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "moe_intermediate_size": cfg.d_expert,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_key_value_heads,
        "n_shared_experts": cfg.d_shared_expert // cfg.d_expert,
        "n_routed_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "first_k_dense_replace": min(cfg.moe_layers),
        "moe_layer_freq": 1,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": "softmax",
        "aux_loss_alpha": aux_loss_alpha,
        "seq_aux": False,
        "hidden_act": cfg.act_fn,
        "max_position_embeddings": cfg.n_ctx,
        "initializer_range": 0.02,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
        "torch_dtype": str(cfg.dtype).removeprefix("torch."),
    }


@torch.no_grad()
def init_weights_(model: HookedMoETransformer, std: float = 0.02) -> None:
    """Normal(0, std) matrices, output projections (attention w_o, MLP/expert down) scaled by
    1/sqrt(2 n_layers) as in GPT-2; norm gains one."""
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, param in model.named_parameters():
        if param.ndim == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, out_std if name.endswith(("w_o", "w_down", "W_down")) else std)


# --------------------------------------------------------------------------------- training
def load_balancing_loss(
    probs: Float[torch.Tensor, "batch pos n_experts"], indices: Int[torch.Tensor, "batch pos k"]
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss n_experts * sum_e f_e P_e, with f_e the fraction of
    routing slots sent to expert e and P_e its mean router probability (1 when uniform)."""
    n_experts = probs.shape[-1]
    fraction = torch.bincount(indices.flatten(), minlength=n_experts).to(probs.dtype) / indices.numel()
    mean_prob = probs.flatten(0, -2).mean(0)
    return n_experts * (fraction * mean_prob).sum()


def routing_recorder() -> tuple[dict[str, torch.Tensor], list]:
    """A dict filled with every MoE layer's router probs and top-k ids on each forward pass, and
    the forward hooks that fill it (for `model.hooks(fwd_hooks=...)`)."""
    record: dict[str, torch.Tensor] = {}

    def store(tensor: torch.Tensor, hook) -> None:
        record[hook.name] = tensor

    wanted = ("mlp.hook_router_probs", "mlp.hook_topk_indices")
    return record, [(lambda name: name.endswith(wanted), store)]


def aux_loss(record: dict[str, torch.Tensor], moe_layers: tuple[int, ...]) -> torch.Tensor:
    """The load-balancing loss averaged over the MoE layers."""
    losses = [
        load_balancing_loss(record[f"blocks.{l}.mlp.hook_router_probs"], record[f"blocks.{l}.mlp.hook_topk_indices"])
        for l in moe_layers
    ]
    return torch.stack(losses).mean()


def make_optimizer(model: HookedMoETransformer, args) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW (weight decay on matrices only) with linear warm-up and cosine decay to lr_min_ratio * lr."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr_min_ratio + (1 - args.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, LambdaLR(optimizer, schedule)


def train(model: HookedMoETransformer, sampler: WindowSampler, held_out: dict[str, list[str]], args) -> None:
    """The training loop; prints mean train/aux loss every `log_every` steps and the mean
    held-out loss every `eval_every` steps."""
    optimizer, scheduler = make_optimizer(model, args)
    record, hooks = routing_recorder()
    start, lm_sum, aux_sum = time.time(), 0.0, 0.0
    print(f"{'step':>6} {'train loss':>10} {'aux loss':>9} {'lr':>9} {'elapsed':>8}")
    for step in range(1, args.steps + 1):
        model.train()
        with model.hooks(fwd_hooks=hooks):
            lm = model(sampler.sample(args.batch_size), return_type="loss")
        balance = aux_loss(record, model.cfg.moe_layers)
        (lm + args.aux_loss_alpha * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        lm_sum, aux_sum = lm_sum + lm.item(), aux_sum + balance.item()
        if step % args.log_every == 0:
            lr = scheduler.get_last_lr()[0]
            lm_mean, aux_mean, elapsed = lm_sum / args.log_every, aux_sum / args.log_every, time.time() - start
            print(f"{step:>6} {lm_mean:>10.4f} {aux_mean:>9.4f} {lr:>9.2e} {elapsed:>7.0f}s", flush=True)
            lm_sum, aux_sum = 0.0, 0.0
        if step % args.eval_every == 0:
            losses = held_out_losses(model, held_out, max_tokens=args.eval_tokens)
            mean = sum(losses.values()) / len(losses)
            print(f"{step:>6} held-out loss {mean:.4f} (first {args.eval_tokens} tokens per domain)", flush=True)


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def held_out_losses(
    model: HookedMoETransformer, corpora: dict[str, list[str]], max_tokens: int | None = None, batch_size: int = 16
) -> dict[str, float]:
    """Mean next-token loss (nats) per domain over chunks of at most n_ctx tokens, each starting
    with <bos>; with `max_tokens`, over that many leading tokens of each domain only."""
    model.eval()
    losses = {}
    for name, texts in corpora.items():
        total, count = 0.0, 0
        for batch in iter_token_batches(model.tokenizer, texts, model.cfg.n_ctx, batch_size, max_tokens=max_tokens):
            nll = model(batch.tokens, attention_mask=batch.attention_mask, return_type="loss", loss_per_token=True)
            total, count = total + nll.sum().item(), count + int(batch.attention_mask[:, 1:].sum())
        losses[name] = total / count
    return losses


def report_perplexities(model: HookedMoETransformer, corpora: dict[str, dict[str, list[str]]]) -> None:
    """Print the perplexity per domain of each named group of corpora."""
    for group, texts in corpora.items():
        print(f"\n{group} perplexity (uniform over the vocabulary: {model.cfg.d_vocab}):")
        for name, loss in held_out_losses(model, texts).items():
            print(f"  {name:<20} loss {loss:.4f}  perplexity {math.exp(loss):8.2f}")


@torch.no_grad()
def round_to_bfloat16_(model: HookedMoETransformer) -> None:
    """Round every weight to the nearest bfloat16 value, kept in the model's dtype, so that the
    bfloat16 checkpoint holds exactly this model."""
    for param in model.parameters():
        param.copy_(param.to(torch.bfloat16))


def save_and_verify(
    model: HookedMoETransformer, out: Path, hf_config: dict, probe: Int[torch.Tensor, "batch pos"]
) -> None:
    """Save in the hub layout with bfloat16 tensors, load back through `from_pretrained` (in
    config.json's float32) and require identical logits (the weights are already rounded)."""
    save_hub_checkpoint(model, out, hf_config, dtype=torch.bfloat16)
    reloaded = HookedMoETransformer.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(probe), reloaded(probe))
    if not same:
        raise RuntimeError(f"the checkpoint saved in {out} does not reproduce the trained model's logits")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"\nsaved {out} ({size:.1f} MiB); from_pretrained reproduces the logits exactly")


# ------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "domains")
    parser.add_argument("--out", type=Path, default=REPO / "moe_hooked" / "assets" / "demo_model")
    parser.add_argument("--held-out", type=int, default=5, help="samples kept aside at the end of each file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads; on a shared 2-core machine 2 threads spent ~6x the CPU time per step (spin-waiting)",
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--generated-samples", type=int, default=1500, help="extra generated samples per built-in domain")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--d-mlp", type=int, default=1024)
    parser.add_argument("--d-expert", type=int, default=192)
    parser.add_argument("--n-shared-experts", type=int, default=2, help="shared width = this * d_expert")
    parser.add_argument("--n-experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-min-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--aux-loss-alpha", type=float, default=0.01)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per domain, periodic evaluation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    train_texts, held_out = read_domains(args.data, args.held_out, args.generated_samples)
    tokenizer = train_tokenizer([t for texts in train_texts.values() for t in texts], args.vocab_size)
    streams = token_streams(tokenizer, train_texts)
    counts = ", ".join(f"{name} {len(stream)}" for name, stream in streams.items())
    print(f"tokenizer: {len(tokenizer)} ids; training tokens: {counts}")
    model = HookedMoETransformer(demo_config(args, tokenizer), tokenizer)
    init_weights_(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, MoE layers {list(model.cfg.moe_layers)}")
    sampler = WindowSampler(streams, args.n_ctx, tokenizer.bos_token_id, args.seed)
    train(model, sampler, held_out, args)
    print(f"\ntraining took {time.time() - started:.0f}s wall-clock, {time.process_time():.0f}s CPU time")
    round_to_bfloat16_(model)
    builtin = {BUILTIN_PREFIX + name: texts for name, texts in builtin_corpora().items()}
    report_perplexities(model, {"held-out": held_out, "built-in corpora (training text)": builtin})
    probe = model.to_tokens([texts[0] for texts in held_out.values()])[:, : args.n_ctx]
    save_and_verify(model, args.out, hub_config(model.cfg, args.aux_loss_alpha), probe)


if __name__ == "__main__":
    main()
