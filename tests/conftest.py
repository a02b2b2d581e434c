import os

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 2 logical CPUs, a 200 MB object store (this machine has 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module, restored afterwards (see the modules that use it)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def perturb_weights():
    """``perturb(directory, seed, scale)``: add seeded noise to every float tensor of ``model.safetensors`` in place,
    as fine-tuning would (tiny fixtures' norms are all ones otherwise, and identical experts hide merge bugs)."""
    def perturb(directory, seed: int, scale: float):
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(directory / "model.safetensors"))
        g = torch.Generator().manual_seed(seed)
        tensors = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in tensors.items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory

    return perturb


@pytest.fixture
def definition_traces(monkeypatch):
    """``definition_traces.run(gen.generate, prompts, ...)`` -> ``(output, ScoreTrace)``: the scores every token of a
    DefinitionGenerator in this process was picked from (tests/score_trace.py)."""
    from score_trace import DefinitionTraces

    return DefinitionTraces(monkeypatch)


@pytest.fixture(scope="session")
def micro_seed(tmp_path_factory):
    """A tiny random Llama as the micro pipeline's seed model."""
    from lm_lexicon.seed_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("micro_seed") / "tiny-llama")


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, micro_seed):
    """One run of the micro pipeline (tests/micro_pipeline.py) as ``jobs/pipeline.py`` in a subprocess, shared by
    the tests that need a finished run: its output dir, its terminal output (stdout / stderr lines), its log."""
    import time

    from micro_pipeline import run_micro_pipeline

    out = tmp_path_factory.mktemp("micro_run") / "run"
    t0 = time.perf_counter()
    proc = run_micro_pipeline(out, micro_seed)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return {"out": out, "stdout": proc.stdout.splitlines(), "stderr": proc.stderr.splitlines(),
            "log": (out / "logs" / "pipeline.log").read_text(), "seconds": time.perf_counter() - t0}
