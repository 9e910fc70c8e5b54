"""The real trainer with expert parallel (recipe tiny_moe_ep, ep=2 on 4 processes: edp=2) matches the
single-process tiny_moe run: DeepSeek-V3-style routing (sigmoid scores, balancing bias updated from the
global counts after every step) and ZeRO-3, 5 steps + one evaluation (fp32; bounds of
shardwise/testing/tolerance.py).

It checks the wiring: build_data_parallel returns the MoE engine for ep > 1 (else the experts would be
reduced over the whole dp group and diverge), and the trainer calls update_expert_bias with the
all-reduced counts (else the reference's bias stays zero and the asserted bias movement fails).
The same launch also runs the job with parallel.ep_overlap_chunks=2 (chunked, overlapped all-to-all
dispatcher; shardwise.parallel.ep_overlap), which must match the same reference."""
import pytest

from shardwise.testing import run_distributed

from shardwise.testing.tolerance import EQUIV_ADAM_EPS, assert_params_close, assert_series_close, expect_mismatch

from test_trainer import _losses_aux_params, _train
from trainer_runs import fit_runs, param_tol

EXTRA = ["model.moe.router_score=sigmoid", "model.moe.bias_update_rate=0.01", "zero.stage=3"]


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("swcache"))


def _overrides(recipe, cache):
    return [f"recipe={recipe}", f"data.cache_dir={cache}", "trainer.max_steps=5", "trainer.log_every=1",
            "trainer.eval_every=5", "trainer.eval_iters=4", "data.seq_len=64", "data.global_batch_size=8",
            "data.micro_batch_size=2", "logging.progress_bar=false", "logging.console=false",
            f"optim.eps={EQUIV_ADAM_EPS}", *EXTRA]


def _summary(trainer, history):
    """Losses, aux losses, final parameters, and the chunk count of the MoE layers' dispatchers."""
    from shardwise.parallel.expert_parallel import moe_layers
    chunks = sorted({getattr(m.dispatcher, "chunks", 1) for m in moe_layers(trainer.raw_model)})
    return (*_losses_aux_params(trainer, history), chunks)


def _ep_runs(rank, world, overrides, run_dir):
    """ep2, ep2 under the missing-reduction ablation, ep2 with parallel.ep_overlap_chunks=2, ep4 with
    parallel.ep_overlap_chunks=4: one launch."""
    runs = [overrides, overrides, [*overrides, "parallel.ep_overlap_chunks=2"],
            [*overrides, "parallel.ep=4", "parallel.ep_overlap_chunks=4"]]
    return fit_runs(rank, world, runs, run_dir, _summary, ablations=[None, "missing_reduction", None, None])


def test_trainer_ep2_on_4_processes_matches_single_process(corpus_cache, tmp_path):
    cache_dir = corpus_cache
    (ref_loss, _, ref_params), = run_distributed(_train, 1, _overrides("tiny_moe", cache_dir), str(tmp_path / "r"),
                                                 timeout=180)
    assert ref_params["layers.0.mlp.router.expert_bias"].abs().sum() > 0, "the trainer never updated the bias"
    tol = param_tol(_overrides("tiny_moe", cache_dir))

    def check(run, what):
        loss, _, params, _ = run
        assert_series_close(loss, ref_loss, f"{what} losses")
        assert_params_close(params, ref_params, tol, what)
    # The same job again with the dense and expert dp gradient reductions skipped: that comparison must fail.
    for run, ablated, overlapped, ep4 in run_distributed(_ep_runs, 4, _overrides("tiny_moe_ep", cache_dir),
                                                         str(tmp_path / "ep"), timeout=300):
        assert run[3] == [1] and overlapped[3] == [2] and ep4[3] == [4], \
            "parallel.ep_overlap_chunks did not reach the MoE layers"
        check(run, "ep2")
        check(overlapped, "ep2 ep_overlap_chunks=2")
        check(ep4, "ep4 ep_overlap_chunks=4")
        print(expect_mismatch(lambda: check(ablated, "ablated ep2"), "missing_reduction"))
