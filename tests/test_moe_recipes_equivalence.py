"""The new MoE recipes train identically at any layout: the real Trainer, 5 steps + one evaluation, fp32,
against the single-process run (losses, eval loss, clipping norms, aux loss, tokens per expert, every final
parameter and the balancing-bias buffers; bounds of shardwise/testing/tolerance.py).

- tiny_deepseek_v3 (latent attention, node-limited sigmoid routing with the balancing bias, routed scaling,
  sequence-wise loss, shared + fine-grained experts, one MTP module) at EP=2 x TP=2 with sequence parallel
  and ZeRO-3 (the latent projections' and the MTP projection's partial gradients, the MTP input shift across
  sequence shards, the experts' unit hooks), and at PP=2 x EP=2 (ZeRO-1; MTP off: not supported with pp);
- tiny_qwen_moe (q/k/v biases, gated shared expert) at EP=2 x TP=2 (ZeRO-1), at EP=2 x TP=2 with sequence
  parallel, ZeRO-3 and both overlap knobs (parallel.tp_overlap_chunks=2, parallel.ep_overlap_chunks=2), and
  PP=2 x DP=2 (ZeRO-2);
- every comparison can fail: the same EP x TP run with the data-parallel gradient reductions skipped must
  not match.
Two launches: one process for the references, four for everything else.
"""
import pytest
import torch

from shardwise.testing import run_distributed
from shardwise.testing.tolerance import AUX_ATOL, LOSS_ATOL, LOSS_RTOL, assert_params_close, expect_mismatch

from trainer_runs import fit_runs, param_tol, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # one module fixture runs every case (harness limits 900 + 1200 s)

NO_MTP = ["model.mtp_depth=0"]
EP_TP = ["parallel.ep=2", "parallel.tp=2"]
# name: (recipe, overrides of both runs, overrides of the 4-process run, ablation of the 4-process run)
CASES = {
    "v3_ep2_tp2_sp": ("tiny_deepseek_v3", [], EP_TP + ["parallel.sequence_parallel=true", "zero.stage=3"], None),
    "v3_pp2_ep2": ("tiny_deepseek_v3", NO_MTP, ["parallel.pp=2", "parallel.ep=2", "zero.stage=1",
                                                  "parallel.pp_schedule=1f1b"], None),
    "qwen_ep2_tp2": ("tiny_qwen_moe", [], EP_TP + ["zero.stage=1"], None),
    # both overlap knobs at once: chunked row- and column-parallel GEMMs (q/k/v with biases) and chunked
    # expert all-to-alls, under sequence parallel and ZeRO-3
    "qwen_ep2_tp2_sp_overlap": ("tiny_qwen_moe", [], EP_TP + ["parallel.sequence_parallel=true", "zero.stage=3",
                                                             "parallel.tp_overlap_chunks=2",
                                                             "parallel.ep_overlap_chunks=2"], None),
    "qwen_pp2": ("tiny_qwen_moe", [], ["parallel.pp=2", "zero.stage=2", "parallel.pp_schedule=1f1b"], None),
    "v3_ep2_tp2_ablated": ("tiny_deepseek_v3", [], EP_TP + ["zero.stage=1"], "missing_reduction"),
}
REFS = {"tiny_deepseek_v3": [], "tiny_deepseek_v3_nomtp": NO_MTP, "tiny_qwen_moe": []}


def _summary(tr, hist):
    return {"loss": [h["loss"] for h in hist], "eval": [h["eval_loss"] for h in hist if "eval_loss" in h],
            "aux": [h.get("aux_loss") for h in hist], "norm": [h["grad_norm"] for h in hist],
            "tpe": [h.get("moe_tokens_per_expert") for h in hist], "params": tr.full_state_dict()}


def _ref_key(case):
    recipe, both, _, _ = CASES[case]
    return recipe + ("_nomtp" if both == NO_MTP else "")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("swcache"))
    names = list(REFS)
    refs = run_distributed(fit_runs, 1, [tiny_overrides(n.replace("_nomtp", ""), cache, *REFS[n]) for n in names],
                           str(tmp_path_factory.mktemp("ref")), _summary, timeout=900)[0]
    runs = [tiny_overrides(r, cache, *both, *extra) for r, both, extra, _ in CASES.values()]
    out = run_distributed(fit_runs, 4, runs, str(tmp_path_factory.mktemp("multi")), _summary,
                          [c[3] for c in CASES.values()], timeout=1200)
    return dict(zip(names, refs)), {k: [out[r][i] for r in range(4)] for i, k in enumerate(CASES)}


def _check(case, res, ref, rank):
    def close(a, b, what, atol=LOSS_ATOL):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=LOSS_RTOL, atol=atol,
                                   msg=lambda m: f"{case} rank {rank} {what}: {m}")
    close(res["loss"], ref["loss"], "loss")
    close(res["eval"], ref["eval"], "eval loss")
    close(res["norm"], ref["norm"], "grad norm")
    close(res["aux"], ref["aux"], "aux loss", AUX_ATOL)
    close(res["tpe"], ref["tpe"], "tokens per expert")
    recipe, both, _, _ = CASES[case]
    assert_params_close(res["params"], ref["params"], param_tol(tiny_overrides(recipe, "unused", *both)),
                        f"{case} rank {rank}")


def test_references_exercise_the_features(results):
    refs, _ = results
    v3 = refs["tiny_deepseek_v3"]
    assert v3["norm"][0] > 1.0  # optim.grad_clip=1.0 clips: the norm over all shards is under test
    assert v3["params"]["layers.1.mlp.router.expert_bias"].abs().sum() > 0  # the balancing bias moved
    assert "mtp.0.block.mlp.router.expert_bias" in v3["params"]  # the MTP block's MoE trains too
    # the MTP loss (lambda * CE ~ 0.3 * 5.8) dominates the aux loss; without MTP it is the sequence loss only
    assert v3["aux"][0] > 1.0 and refs["tiny_deepseek_v3_nomtp"]["aux"][0] < 1e-2
    assert refs["tiny_qwen_moe"]["params"]["layers.0.attn.wq.bias"].abs().sum() > 0


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("ablated")])
def test_new_recipes_match_single_process(results, case):
    refs, multi = results
    for rank, res in enumerate(multi[case]):
        _check(case, res, refs[_ref_key(case)], rank)


def test_ablated_run_does_not_match(results):
    refs, multi = results
    case = "v3_ep2_tp2_ablated"
    print(expect_mismatch(lambda: _check(case, multi[case][0], refs[_ref_key(case)], 0), "missing_reduction"))
