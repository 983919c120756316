"""Multi-rank checks of the Megatron-Core layer, run with ``torchrun --nproc-per-node 4`` (gloo on CPU).

One launch re-initialises Megatron's parallel state for each layout (the world of 4 ranks stays):
1. logits parity: tiny Llama / Qwen2 / Qwen3 models against HF transformers at TP1PP1, TP2PP1, TP1PP2, TP2PP2;
2. training equivalence: 3 AdamW steps (Megatron DDP + distributed optimizer) in fp32 and bf16 at TP2PP2, TP2, PP2,
   TP2 + sequence parallel and TP1PP1 (data parallel 4), all from the same HF weights: losses and gradient norms
   (Adam's first steps barely depend on gradient magnitudes, so the norms are the sharper check of the backward);
3. a checkpoint written by training at TP2PP2, for the caller to export with tools/convert_hf.py and compare with
   the TP1PP1 run's final weights;
4. length-trimmed micro-batches at TP1PP1 and TP2PP2 (tiny Qwen3, fp32): the one-pass forward's old log-probs and
   pooled embeddings, and a token-mean loss with its gradients, against the padded schedule (every micro-batch at
   the batch's width, in row order);
5. our decode step at TP1 and TP2 (float64, every family): logits of a left-padded batch fed column by column against
   the Megatron forward of the same layout (vocabulary shards gathered), and whole rollouts of the engine with our
   step against TP1's (tokens, log-probs).
Rank 0 writes every measured number to the JSON file given as argv[1]; the pytest wrapper asserts on them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_grace.checkpointing import save_checkpoint
from megatron_grace.utils import unwrap
from megatron_grace.data.prompts import Prompt
from megatron_grace.grpo.experience import SequenceBatch, one_pass_forward
from megatron_grace.rollout import Rollout, RolloutEngine, RolloutRequest
from megatron_grace.kernels.sample_tokens import row_seed
from megatron_grace.models import architecture_from_hf_config
from megatron_grace.models.builder import build_gpt_model, make_transformer_config
from megatron_grace.models.hf_io import load_hf_weights, save_hf_model
from megatron_grace.models.state_dict import mcore_to_hf
from megatron_grace.config import OptimConfig, RolloutConfig
from megatron_grace.optim import optimizer_step, wrap_for_training, zero_grads
from megatron_grace.platform import ParallelLayout, initialize_distributed, seed_everything
from megatron_grace.schedule import run_microbatches
from megatron_grace.testing import FAMILIES, decode_logits_column_by_column, left_padded_batch, tiny_hf_model

SEQ, GLOBAL_BATCH, STEPS = 16, 8, 3


def set_layout(tp: int, pp: int) -> None:
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(1234)


def arch_of(hf_model):
    config = hf_model.config.to_dict()
    config["architectures"] = [type(hf_model).__name__]
    return architecture_from_hf_config(config)


def build_loaded(hf_model, dtype=torch.float32, sequence_parallel=False):
    arch = arch_of(hf_model)
    model = build_gpt_model(arch, make_transformer_config(arch, params_dtype=dtype,
                                                          sequence_parallel=sequence_parallel))
    load_hf_weights(model, hf_model.state_dict(), arch)
    return model, arch


def microbatches_for_this_rank(tokens, loss_mask, micro_batch_size):
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = tokens.shape[0] // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    positions = torch.arange(tokens.shape[1]).expand(per_rank, -1)
    local = [(tokens[rows], loss_mask[rows], positions)]
    out = []
    for tok, mask, pos in local:
        for start in range(0, per_rank, micro_batch_size):
            end = start + micro_batch_size
            out.append({"tokens": tok[start:end], "position_ids": pos[start:end], "loss_mask": mask[start:end]})
    return out


def logits_parity(results: dict) -> None:
    tokens = torch.randint(0, 49152, (2, SEQ), generator=torch.Generator().manual_seed(7))
    for family in FAMILIES:
        hf_model = tiny_hf_model(family)
        with torch.no_grad():
            reference = hf_model(tokens).logits
        for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
            set_layout(tp, pp)
            model, arch = build_loaded(hf_model)
            model.eval()
            gathered = {}

            def keep_logits(batch, output):
                gathered["logits"] = gather_from_tensor_model_parallel_region(output.logits)[..., : arch.vocab_size]
                return output.logits.sum() * 0, torch.tensor(1), {}

            positions = torch.arange(SEQ).expand(2, -1)
            with torch.no_grad():
                run_microbatches(model, [{"tokens": tokens, "position_ids": positions}], keep_logits,
                                 forward_only=True, need_logits=True)
            diff = torch.zeros(())
            if parallel_state.is_pipeline_last_stage():
                diff = (gathered["logits"] - reference).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            results.setdefault("logits_max_abs_diff", {})[f"{family}/tp{tp}pp{pp}"] = diff.item()


def train_losses(hf_model, tp, pp, dtype, sequence_parallel, tokens, loss_mask, save_dir=None):
    set_layout(tp, pp)
    model, arch = build_loaded(hf_model, dtype, sequence_parallel)
    ddp_model, optimizer = wrap_for_training(model, OptimConfig(lr=1e-3, weight_decay=0.01, clip_grad=1.0))

    def lm_loss(batch, output):
        log_probs = output.log_probs
        mask = batch["loss_mask"][:, 1:].float()
        loss_sum = -(log_probs * mask).sum()
        count = mask.sum().to(torch.int)
        return loss_sum, count, {"loss_sum": loss_sum.detach(), "count": count}

    losses, grad_norms = [], []
    for _ in range(STEPS):
        zero_grads(ddp_model, optimizer)
        out = run_microbatches(ddp_model, microbatches_for_this_rank(tokens, loss_mask, 1), lm_loss,
                               forward_only=False)
        applied, grad_norm = optimizer_step(ddp_model, optimizer)
        grad_norms.append(grad_norm)
        total = torch.zeros(2, dtype=torch.float64)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            total[0] = sum(m["loss_sum"].double() for m in out)
            total[1] = sum(m["count"].double() for m in out)
        dist.all_reduce(total)
        losses.append((total[0] / total[1]).item())
    final_state = None
    if tp == pp == 1:
        final_state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()
                       if not k.endswith("_extra_state")}
    if save_dir is not None:
        save_checkpoint(save_dir, STEPS, ddp_model, optimizer, arch=arch)
    return losses, grad_norms, final_state, arch


def training_equivalence(results: dict, out_dir: Path) -> None:
    generator = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 49152, (GLOBAL_BATCH, SEQ), generator=generator)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.3).long()  # uneven token counts per row
    hf_model = tiny_hf_model("qwen2")  # tied embeddings: exercises the embedding all-reduce across PP stages
    layouts = [(1, 1, False), (2, 2, False), (2, 1, False), (1, 2, False), (2, 1, True)]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for tp, pp, sp in layouts:
            save = out_dir / "ckpt_tp2pp2" if (tp, pp, dtype) == (2, 2, torch.float32) else None
            losses, grad_norms, final_state, arch = train_losses(hf_model, tp, pp, dtype, sp, tokens, loss_mask, save)
            key = f"tp{tp}pp{pp}" + ("_sp" if sp else "")
            results.setdefault(f"losses_{name}", {})[key] = losses
            results.setdefault(f"grad_norms_{name}", {})[key] = grad_norms
            if final_state is not None and dtype == torch.float32 and dist.get_rank() == 0:
                save_hf_model(out_dir / "hf_tp1pp1_trained", arch, mcore_to_hf(final_state, arch))


def rollout_batch(rows: int, seed: int) -> SequenceBatch:
    """A GRACE-like batch: prompts of 6-20 tokens, rationales of 1-40 (a long tail, as rationales have)."""
    generator = torch.Generator().manual_seed(seed)
    prompts, rollouts = [], []
    for _ in range(rows):
        prompt_length = int(torch.randint(6, 21, (), generator=generator))
        response_length = int(torch.randint(1, 41, (), generator=generator) ** 2 // 40) + 1
        tokens = torch.randint(3, 512, (prompt_length + response_length,), generator=generator).tolist()
        prompts.append(Prompt(tokens[:prompt_length], pool_start=2))
        rollouts.append(Rollout(tokens[prompt_length:], [0.0] * response_length, truncated=False))
    return SequenceBatch.build(prompts, rollouts, pad_token_id=0)


def trimmed_microbatches(results: dict) -> None:
    hf_model = tiny_hf_model("qwen3", vocab_size=512)
    batch = rollout_batch(rows=10, seed=3)
    results["padding_share"] = {"padded": batch.padding_share(2, length_trimmed=False),
                                "trimmed": batch.padding_share(2)}
    for tp, pp in ((1, 1), (2, 2)):
        set_layout(tp, pp)
        model, _ = build_loaded(hf_model)
        ddp_model, optimizer = wrap_for_training(model, OptimConfig(lr=1e-3))
        measured = {}
        for trimmed in (False, True):
            experience = one_pass_forward(ddp_model, batch, 2, length_trimmed=trimmed)

            def token_mean_loss(micro, output):
                mask = (micro["response_mask"] & ~micro["is_filler"].unsqueeze(1)).float()
                loss_sum = -(output.log_probs * mask).sum()
                return loss_sum, mask.sum().to(torch.int), {"loss_sum": loss_sum.detach()}

            zero_grads(ddp_model, optimizer)
            outputs = run_microbatches(ddp_model, batch.microbatches(2, length_trimmed=trimmed), token_mean_loss,
                                       forward_only=False)
            loss = torch.zeros((), dtype=torch.float64)
            if parallel_state.is_pipeline_last_stage():
                loss += sum(o["loss_sum"].double() for o in outputs) / batch.response_lengths.sum()
            measured[trimmed] = (experience, loss, [p.main_grad.clone() for p in ddp_model.parameters()])
        (padded, padded_loss, padded_grads), (trimmed, trimmed_loss, trimmed_grads) = measured[False], measured[True]
        diffs = torch.zeros(4, dtype=torch.float64)
        if parallel_state.is_pipeline_last_stage():
            diffs[0] = (padded.old_log_probs - trimmed.old_log_probs).abs().max()
            diffs[1] = (padded.embeddings - trimmed.embeddings).abs().max()
            diffs[2] = (padded_loss - trimmed_loss).abs()
        diffs[3] = max(float(((a - b).abs().max() / a.abs().max().clamp(min=1e-12))) for a, b in
                       zip(padded_grads, trimmed_grads))
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        loss_value = padded_loss.clone()
        dist.all_reduce(loss_value, op=dist.ReduceOp.MAX)
        results.setdefault("trimmed_vs_padded", {})[f"tp{tp}pp{pp}"] = {
            "old_log_probs": diffs[0].item(), "embeddings": diffs[1].item(), "loss": diffs[2].item(),
            "grad_rel": diffs[3].item(), "loss_value": loss_value.item()}


def decode_step_layouts(results: dict) -> None:
    generator = torch.Generator().manual_seed(11)
    tokens, starts, mask = left_padded_batch([7, 3, 10], 512, generator)
    prompts = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in (4, 9)]
    requests = [RolloutRequest(prompts[row % 2], 1.0 if row < 3 else 0.5, row_seed(5, 1, row, 0)) for row in range(4)]
    for family in FAMILIES:
        hf_model = tiny_hf_model(family, vocab_size=512, eos_token_id=2)
        reference_rollouts = None
        for tp in (1, 2):
            set_layout(tp, 1)
            model, arch = build_loaded(hf_model, dtype=torch.float64)
            model.eval()
            with torch.no_grad():
                expected = gather_from_tensor_model_parallel_region(
                    model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), mask))
                ours = gather_from_tensor_model_parallel_region(decode_logits_column_by_column(model, tokens, starts))
            real = torch.arange(tokens.shape[1]).unsqueeze(0) >= starts.unsqueeze(1)
            diff = (ours[real][:, : arch.vocab_size] - expected[real][:, : arch.vocab_size]).abs().max()
            rollouts = RolloutEngine(model, RolloutConfig(rollout_sync_interval=3), eos_token_ids=[2],
                                     pad_token_id=0).generate(requests, 8)
            reference_rollouts = reference_rollouts or rollouts
            log_prob_diff = max(abs(a - b) for ours_row, ref_row in zip(rollouts, reference_rollouts)
                                for a, b in zip(ours_row.log_probs, ref_row.log_probs))
            results.setdefault("decode_step", {})[f"{family}/tp{tp}"] = {
                "logits_vs_megatron": diff.item(),
                "tokens_equal_tp1": [r.response for r in rollouts] == [r.response for r in reference_rollouts],
                "log_probs_vs_tp1": log_prob_diff, "tokens": sum(len(r.response) for r in rollouts)}


def main() -> None:
    out_path = Path(sys.argv[1])
    initialize_distributed(ParallelLayout())
    results: dict = {}
    logits_parity(results)
    training_equivalence(results, out_path.parent)
    trimmed_microbatches(results)
    decode_step_layouts(results)
    if dist.get_rank() == 0:
        out_path.write_text(json.dumps(results, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
