"""Train and export the demo MoE that ships in moeserve/assets/demo-moe.

A small Mixtral (8 experts, top-2, SwiGLU experts, RoPE, GQA, RMSNorm) learns the tasks of
moeserve/demo_tasks.py on CPU. Training uses what MoE write-ups teach: a noisy top-k router
(Shazeer et al. 2017: logits + N(0,1) * softplus(x W_noise), annealed linearly to zero over
the first 30% of the steps so the experts finish training under inference routing), the
Switch/Mixtral load-balancing loss E * sum_e f_e * P_e (weight 0.01), and cross-entropy on
the answer tokens only; no capacity factor (no token is dropped, as at inference). At
evaluation and after export the router is plain Mixtral: softmax, top-2, renormalise. The
export writes the Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json) and checks that
transformers and moeserve reproduce this script's logits and greedy answers.

Recorded run (2 CPU cores, torch 2.13 CPU, seeds fixed; the files in the package are its output):

    time python scripts/train_demo.py --out moeserve/assets/demo-moe

    real 15m18.6s (914 s of training + export), 2026-11-23
    held-out greedy accuracy: add 0.990 sub 0.990 reverse 1.000 sort 1.000
    export verified: transformers logits max |diff| 7.63e-06; moeserve greedy and logprobs
    equal on 40 prompts
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from torch import nn

from moeserve import demo_tasks

# Shapes: B sequences, L positions, T tokens, D hidden, H heads, G kv heads, E experts,
# K top-k, F expert intermediate, V vocab.
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama/Mixtral order
CHAT_MARKERS = ["[INST]", "[/INST]"]
ALPHABET = " 0123456789+-" + demo_tasks.LETTERS
UNK, BOS, EOS, PAD = 0, 1, 2, 3
# Mixtral's template without its space after [/INST]: one less token to learn, and the answer
# text comes back exactly as the task states it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}"
    "{% endif %}{% endfor %}"
)
ARCH = dict(
    hidden=128,
    layers=4,
    heads=8,
    kv_heads=4,
    inter=192,
    experts=8,
    top_k=2,
    max_pos=256,
    rope_theta=10000.0,
    eps=1e-5,
)
ARCH_FLAGS = ("hidden", "layers", "heads", "kv_heads", "inter")
# Arithmetic takes longest to learn (subtraction most): more examples than reverse and sort.
TASK_WEIGHTS = [{"add": 2, "sub": 3}.get(t, 1) for t in demo_tasks.TASKS]


def build_tokenizer() -> Tokenizer:
    """Character-level tokenizer: one token per character (digits included, so arithmetic
    sees aligned digits), the chat markers as whole tokens, input lowercased, BOS added."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHAT_MARKERS + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate: no spaces between characters
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_MARKERS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS)]
    )
    return tok


def chat_prompt(question: str) -> str:
    """What CHAT_TEMPLATE renders for one user message (asserted equal at export)."""
    return f"<s>[INST] {question} [/INST]"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x_BHLd: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding as transformers' Llama/Mixtral applies it (rotate_half layout)."""
    d, L = x_BHLd.shape[-1], x_BHLd.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.outer(torch.arange(L, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    x1, x2 = x_BHLd.chunk(2, dim=-1)
    return x_BHLd * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, a: dict) -> None:
        super().__init__()
        self.h, self.g, self.d = a["heads"], a["kv_heads"], a["hidden"] // a["heads"]
        self.theta = a["rope_theta"]
        self.q_proj = nn.Linear(a["hidden"], self.h * self.d, bias=False)
        self.k_proj = nn.Linear(a["hidden"], self.g * self.d, bias=False)
        self.v_proj = nn.Linear(a["hidden"], self.g * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, a["hidden"], bias=False)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(B, L, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x_BLD).view(B, L, self.g, self.d).transpose(1, 2)
        v = self.v_proj(x_BLD).view(B, L, self.g, self.d).transpose(1, 2)
        q, k = rope(q, self.theta), rope(k, self.theta)
        # Right padding only: the causal mask keeps every real token away from the pads.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.h * self.d))


class NoisyTopKMoE(nn.Module):
    """Mixtral's sparse block with a noisy router while training.

    forward returns (output, aux loss); `noise` scales the router noise (0 = Mixtral exactly).
    """

    def __init__(self, a: dict) -> None:
        super().__init__()
        D, F_, E = a["hidden"], a["inter"], a["experts"]
        self.E, self.K = E, a["top_k"]
        self.gate = nn.Linear(D, E, bias=False)
        self.w_noise = nn.Linear(D, E, bias=False)  # training only: never exported
        nn.init.zeros_(self.w_noise.weight)  # start at std softplus(0) = 0.69: explore
        self.w1 = nn.Parameter(torch.randn(E, F_, D) * 0.02)  # gate projection
        self.w3 = nn.Parameter(torch.randn(E, F_, D) * 0.02)  # up projection
        self.w2 = nn.Parameter(torch.randn(E, D, F_) * 0.02)  # down projection

    def forward(self, x_TD: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = self.gate(x_TD)
        probs_TE = logits_TE.float().softmax(-1)
        noisy_TE = logits_TE
        if noise > 0:
            std_TE = F.softplus(self.w_noise(x_TD))
            noisy_TE = logits_TE + noise * torch.randn_like(logits_TE) * std_TE
        top_TK, experts_TK = noisy_TE.topk(self.K, dim=-1)
        # Softmax over the top-k logits = Mixtral's softmax-all, top-k, renormalise.
        weights_TK = top_TK.float().softmax(-1).to(x_TD.dtype)
        flat = experts_TK.flatten()
        order = flat.argsort(stable=True)
        rows = order // self.K
        counts = torch.bincount(flat, minlength=self.E)
        outs = []
        for e, xe in enumerate(x_TD[rows].split(counts.tolist())):
            outs.append(F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T) @ self.w2[e].T)
        y = torch.cat(outs) * weights_TK.flatten()[order, None]
        out_TD = torch.zeros_like(x_TD).index_add_(0, rows, y)
        # Switch/Mixtral balance loss: E * sum_e (share of assignments to e) * (mean prob of e);
        # minimal (1) when both are uniform.
        frac_E = counts.float() / flat.numel()
        aux = self.E * (frac_E * probs_TE.mean(0)).sum()
        return out_TD, aux


class Block(nn.Module):
    def __init__(self, a: dict) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(a["hidden"], a["eps"])
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a["hidden"], a["eps"])
        self.block_sparse_moe = NoisyTopKMoE(a)

    def forward(
        self, x_BLD: torch.Tensor, mask_BL: torch.Tensor, noise: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD))
        h_TD = self.post_attention_layernorm(x_BLD[mask_BL])  # experts skip the pads
        moe_TD, aux = self.block_sparse_moe(h_TD, noise)
        x_BLD = x_BLD.clone()
        x_BLD[mask_BL] += moe_TD
        return x_BLD, aux


class DemoMixtral(nn.Module):
    """A plain-torch Mixtral whose parameter names map 1:1 onto the checkpoint's."""

    def __init__(self, a: dict, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, a["hidden"])
        self.layers = nn.ModuleList(Block(a) for _ in range(a["layers"]))
        self.norm = RMSNorm(a["hidden"], a["eps"])
        self.lm_head = nn.Linear(a["hidden"], vocab, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2 and "w_noise" not in name:
                nn.init.normal_(p, std=0.02)

    def forward(
        self, ids_BL: torch.Tensor, noise: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, L, V], mean balance loss over layers)."""
        mask_BL = ids_BL != PAD
        x, aux = self.embed_tokens(ids_BL), torch.zeros(())
        for layer in self.layers:
            x, a = layer(x, mask_BL, noise)
            aux = aux + a / len(self.layers)
        return self.lm_head(self.norm(x)), aux


def make_batch(
    tok: Tokenizer, examples: list[demo_tasks.Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] right-padded, targets [B, L] with -100 everywhere but the answer + EOS)."""
    prompts = tok.encode_batch(
        [chat_prompt(e.question) for e in examples], add_special_tokens=False
    )
    answers = tok.encode_batch([e.answer for e in examples], add_special_tokens=False)
    seqs = [p.ids + a.ids + [EOS] for p, a in zip(prompts, answers)]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), PAD)
    tgt = torch.full((len(seqs), L), -100)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        ids[i, : len(s)] = torch.tensor(s)
        n = len(p.ids)  # position n-1 predicts the first answer token
        tgt[i, n - 1 : len(s) - 1] = torch.tensor(s[n:])
    return ids, tgt


def train_examples(
    rng: random.Random, n: int, tasks: list[str] | None = None
) -> list[demo_tasks.Example]:
    """`n` fresh examples of `tasks` (TASK_WEIGHTS), none of them a held-out question."""
    tasks = tasks or list(demo_tasks.TASKS)
    weights = [TASK_WEIGHTS[demo_tasks.TASKS.index(t)] for t in tasks]
    out: list[demo_tasks.Example] = []
    while len(out) < n:
        ex = demo_tasks.sample(rng.choices(tasks, weights)[0], rng)
        if not demo_tasks.is_held_out(ex.question):
            out.append(ex)
    return out


@torch.no_grad()
def greedy(model: DemoMixtral, tok: Tokenizer, questions: list[str], max_new: int = 8) -> list[str]:
    """Greedy answers without a KV cache (prompts are ~30 tokens: recomputing is cheap)."""
    model.eval()
    seqs = [
        e.ids
        for e in tok.encode_batch([chat_prompt(q) for q in questions], add_special_tokens=False)
    ]
    done = [False] * len(seqs)
    outs: list[list[int]] = [[] for _ in seqs]
    for _ in range(max_new):
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), PAD)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        logits, _ = model(ids)
        last = torch.tensor([len(s) - 1 for s in seqs])
        nxt = logits[torch.arange(len(seqs)), last].argmax(-1).tolist()
        for i, t in enumerate(nxt):
            if not done[i]:
                seqs[i].append(t)
                done[i] = t == EOS
                if not done[i]:
                    outs[i].append(t)
        if all(done):
            break
    return [tok.decode(o) for o in outs]


def evaluate(
    model: DemoMixtral, tok: Tokenizer, per_task: int, tasks: list[str] | None = None
) -> dict[str, float]:
    """Greedy exact-match accuracy per task on the first `per_task` held-out examples."""
    acc = {}
    for task, exs in demo_tasks.held_out().items():
        if tasks and task not in tasks:
            continue
        exs = exs[:per_task]
        answers = greedy(model, tok, [e.question for e in exs])
        acc[task] = sum(a == e.answer for a, e in zip(answers, exs)) / len(exs)
    return acc


def train(args: argparse.Namespace, tok: Tokenizer) -> DemoMixtral:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = DemoMixtral(ARCH, tok.get_vocab_size())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup, t0 = 100, time.monotonic()
    for step in range(1, args.steps + 1):
        progress = step / args.steps
        lr = args.lr * min(step / warmup, 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        # Router noise explores early; it fades out by --noise-until so the experts finish
        # training under the same deterministic routing they get at inference.
        noise = max(0.0, 1.0 - progress / args.noise_until)
        model.train()
        ids, tgt = make_batch(tok, train_examples(rng, args.batch, args.tasks))
        logits, aux = model(ids, noise)
        ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            msg = (
                f"step {step:5d} ce {ce.item():.4f} aux {aux.item():.3f} lr {lr:.2e} "
                f"noise {noise:.2f} {time.monotonic() - t0:6.0f}s"
            )
            if step % args.eval_every == 0:
                acc = evaluate(model, tok, 50, args.tasks)
                msg += " acc " + " ".join(f"{k} {v:.3f}" for k, v in acc.items())
            print(msg, flush=True)
    return model


def export(model: DemoMixtral, tok: Tokenizer, out: Path) -> None:
    """Write the Hugging Face layout: Mixtral tensor names, config, tokenizer, chat template."""
    from transformers import MixtralConfig

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if "w_noise" in name:
            continue  # the noise projection exists only in training
        if name.startswith(("embed_tokens", "layers", "norm")):
            name = "model." + name
        if name.endswith((".w1", ".w2", ".w3")):
            stem, w = name.rsplit(".", 1)
            for e in range(p.shape[0]):
                tensors[f"{stem}.experts.{e}.{w}.weight"] = p[e].contiguous()
            continue
        tensors[name] = p.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    a = ARCH
    cfg = MixtralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=a["hidden"],
        intermediate_size=a["inter"],
        num_hidden_layers=a["layers"],
        num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"],
        num_local_experts=a["experts"],
        num_experts_per_tok=a["top_k"],
        max_position_embeddings=a["max_pos"],
        rms_norm_eps=a["eps"],
        rope_parameters={"rope_type": "default", "rope_theta": a["rope_theta"]},
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
        sliding_window=None,
        architectures=["MixtralForCausalLM"],
        dtype="float32",
    )
    cfg.save_pretrained(out)
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"), pretty=False)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as written
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": a["max_pos"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


@torch.no_grad()
def verify_export(model: DemoMixtral, tok: Tokenizer, out: Path, n: int = 40) -> None:
    """transformers and moeserve must reproduce this model's logits and greedy answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeserve import LLM, SamplingParams
    from moeserve.tokenizer import Tokenizer as MoeTokenizer

    per_task = n // len(demo_tasks.TASKS)
    exs = [e for t in demo_tasks.TASKS for e in demo_tasks.held_out()[t][:per_task]]
    msgs = [[{"role": "user", "content": e.question}] for e in exs]
    hf_tok, moe_tok = AutoTokenizer.from_pretrained(out), MoeTokenizer.from_dir(out)
    for m, e in zip(msgs, exs):
        want = chat_prompt(e.question)
        assert moe_tok.apply_chat_template(m) == want, moe_tok.apply_chat_template(m)
        assert hf_tok.apply_chat_template(m, tokenize=False) == want
    model.eval()
    ids, _ = make_batch(tok, exs)
    ours, _ = model(ids)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = hf(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    mask = ids != PAD
    diff = (ours - theirs)[mask].abs().max().item()
    assert diff < 1e-4, f"transformers logits differ by {diff}"
    answers = greedy(model, tok, [e.question for e in exs])
    llm = LLM(out, device="cpu", progress=False, max_model_len=ARCH["max_pos"])
    prompts = [moe_tok.encode(chat_prompt(e.question), add_special_tokens=False) for e in exs]
    res = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, logprobs=1))
    for r, want in zip(res, answers):
        assert r.outputs[0].text == want, (r.outputs[0].text, want)
    # The per-position logprobs of the chosen tokens must match ours.
    for r, p in zip(res, prompts):
        seq = torch.tensor([p + r.outputs[0].token_ids])
        lp = model(seq)[0][0].log_softmax(-1)
        for j, (t, entry) in enumerate(zip(r.outputs[0].token_ids, r.outputs[0].logprobs)):
            got = dict(entry.top)[t]
            assert abs(lp[len(p) - 1 + j, t].item() - got) < 1e-4, (lp[len(p) - 1 + j, t], got)
    print(
        f"export verified: transformers logits max |diff| {diff:.2e}; moeserve greedy and "
        f"logprobs equal on {len(exs)} prompts"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("moeserve/assets/demo-moe"))
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--noise-until",
        type=float,
        default=0.3,
        help="fraction of training with router noise (annealed linearly to 0)",
    )
    p.add_argument("--tasks", nargs="*", default=None, help="train on these only (experiments)")
    for flag in ARCH_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=ARCH[flag])
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ARCH.update({f: getattr(args, f) for f in ARCH_FLAGS})
    t0 = time.monotonic()
    tok = build_tokenizer()
    model = train(args, tok)
    acc = evaluate(model, tok, demo_tasks.HELD_OUT_PER_TASK)
    print("held-out greedy accuracy: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    export(model, tok, args.out)
    verify_export(model, tok, args.out)
    print(f"total {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
