"""The stages on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``: one raylet per node on this
machine), with nodes that die.

The cluster: a head with 1 CPU and a ``head_node`` resource that takes no training work (the training workers ask
for ``expert_node``, which only the worker nodes declare: ``resources.worker_resources={expert_node: 1}``), and 3
worker nodes with 1 CPU and ``expert_node: 1`` each, 100 MB object stores; a local directory stands in for the
shared storage (S3/EFS) that every node reads and writes (``resources.storage_path``).

Each scenario runs this file as a script in a subprocess (``python tests/test_multinode_cluster.py <scenario> <dir>``)
with a private ``RAY_TMPDIR``: the cluster is its own, the session's Ray is untouched, and every process of the
cluster is killed by pid when the subprocess ends (tests/test_shutdown.py's ``Run``). The scenario writes what
happened to ``<dir>/report.json``; the tests assert on it.

* ``experts``: the experts stage (2 experts, 6 steps each, a checkpoint every 2) once uninterrupted, then again
  with the node of one training worker killed (``Cluster.remove_node``, no grace) after both jobs wrote a
  checkpoint. Ray Train's FailureConfig restarts that worker on the spare node from the job's last checkpoint (or,
  if the Tune trial's own node died, Tune restarts the trial, whose trainer resumes the same way). Checked: the
  jobs trained on worker nodes only, side by side on two nodes; the killed job resumed from a checkpoint on another
  node; both jobs end with the same losses and weights as the uninterrupted run. Stated tolerance: 1e-6 relative
  (resuming restores weights, optimizer, RNG and data order exactly on CPU; the tolerance only absorbs another
  node's identical but separately started process).
* ``serve``: the Serve app with its HTTP proxy, ingress, router and scorer on the head and the experts' replicas on 2
  serving nodes (``serve_node``); the node of Expert0's replica is killed while 40 requests for domain 0 (8 at a
  time) are in flight. Checked: every request is answered 200 (the ingress retries calls that hit the dead replica
  until the controller has a new one), none dropped; the replica now runs on the other node.
* ``autoscale``: a head started with Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1 ray start --head
  --autoscaling-config``, not ``AutoscalingCluster``, whose ``ray stop --force`` would kill every Ray on the
  machine) and cluster.yaml's shape in small: a ``cpu-train`` type (``expert_node``, 0-2 nodes) and a ``cpu-serve``
  type (``serve_node``, 0-1). The experts stage (2 jobs at once) asks for ``expert_node`` workers; checked: the
  autoscaler starts cpu-train nodes while the stage runs, never a cpu-serve node, and removes them once idle; the
  node timeline is printed.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_serve_app import pipeline_dir  # noqa: E402,F401 (a fixture: the tiny served pipeline)

MB = 1024 * 1024
STEPS, EVAL_EVERY = 6, 2


# =================================================================================================== the cluster
class SimulatedCluster:
    """Head (no training work) + ``n_workers`` expert nodes; records which actor ran on which node, and when."""

    def __init__(self, n_workers: int = 3, worker_resources: dict | None = None, head_cpus: int = 1):
        import ray
        from ray.cluster_utils import Cluster

        self.t0 = time.time()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "resources": {"head_node": 1}, "object_store_memory": 100 * MB,
            "include_dashboard": False})
        self.workers = [self.cluster.add_node(num_cpus=1, resources=worker_resources or {"expert_node": 1},
                                              object_store_memory=100 * MB) for _ in range(n_workers)]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.names = {self.cluster.head_node.node_id: "head",
                      **{w.node_id: f"worker{i + 1}" for i, w in enumerate(self.workers)}}
        self.events: list[dict] = [{"t": 0.0, "event": "started", "node": n} for n in self.names.values()]
        self.placements: dict[str, dict] = {}  # actor id -> class, node, first and last seen alive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return round(time.time() - self.t0, 1)

    def _watch(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                for actor_id, info in ray._private.state.actors().items():
                    if info["State"] != "ALIVE":
                        continue
                    seen = self.placements.setdefault(actor_id, {
                        "class": info["ActorClassName"], "node": self.names.get(info["Address"]["NodeID"], "?"),
                        "job": info["JobID"], "first": self.now()})
                    seen["last"] = self.now()
            except Exception:
                pass
            self._stop.wait(0.5)

    def alive(self, cls: str) -> list[dict]:
        import ray

        out = []
        for actor_id, info in ray._private.state.actors().items():
            if info["State"] == "ALIVE" and info["ActorClassName"] == cls:
                out.append({"id": actor_id, "node_id": info["Address"]["NodeID"], "job": info["JobID"],
                            "node": self.names.get(info["Address"]["NodeID"], "?")})
        return out

    def kill(self, node_id: str) -> str:
        node = next(w for w in self.workers if w.node_id == node_id)
        name = self.names[node_id]
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        self.events.append({"t": self.now(), "event": "killed", "node": name})
        return name

    def ran_on(self, cls: str) -> list[dict]:
        return [p for p in self.placements.values() if p["class"] == cls]

    def shutdown(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        ray.shutdown()
        self.cluster.shutdown()


# =================================================================================================== scenarios
def _partition_dir(root: Path) -> Path:
    import pandas as pd

    from lm_lexicon.data.records import Record

    rows = {0: [("river", "the river flooded", "a large natural stream of water"),
                ("tree", "an old oak tree", "a tall perennial woody plant"),
                ("snow", "snow covered the field", "frozen water falling in white flakes"),
                ("lake", "they swam in the lake", "a body of water surrounded by land")],
            1: [("loan", "a loan with high interest", "money lent at interest"),
                ("engine", "the engine failed", "a motor that converts energy into motion"),
                ("price", "the price fell", "the amount of money for which a thing is sold"),
                ("robot", "the robot worked", "a machine that performs tasks automatically")]}
    root.mkdir(parents=True)
    valid = []
    for d, items in rows.items():
        recs = [{**Record(term=t, context=c, definition=x, source="test").to_dict(), "domain": d} for t, c, x in items]
        pd.DataFrame(recs).to_parquet(root / f"domain_{d}.parquet", index=False)
        valid.append({**recs[0], "split": "valid"})
    pd.DataFrame(valid).to_parquet(root / "valid.parquet", index=False)
    return root


def _experts_cfg(out: Path, seed: Path, storage: Path):
    from lm_lexicon.config import load_config

    return load_config("configs/tiny.yaml", [
        f"output_dir={out}", f"resources.storage_path={storage}", f"seed_model.name={seed}",
        "train.batch_size=2", f"train.max_steps={STEPS}", f"train.eval_every={EVAL_EVERY}", "train.precision=fp32",
        "train.dropout=0", "train.lr=1e-3", "train.trainable=all", "train.save_dtype=float32",
        "resources.workers_per_expert=1", "resources.cpus_per_worker=1", "resources.max_failures=2",
        "resources.max_concurrent_experts=2", "resources.worker_resources={expert_node: 1}"])


def _run_experts(cluster: SimulatedCluster, work: Path, seed: Path, tag: str, kill_after_checkpoints: bool) -> dict:
    from lm_lexicon.train.stage import run_jobs

    jobs = [{"name": "expert_0", "domain": 0}, {"name": "expert_1", "domain": 1}]
    out = work / tag
    storage = work / "shared-storage"  # every node reads and writes it: the stand-in for S3/EFS
    cfg = _experts_cfg(out, seed, storage)
    stage = out / "experts"
    stage.mkdir(parents=True)
    killed: dict = {}

    def killer() -> None:
        runs = [storage / f"{cfg.name}-{j['name']}-{tag}" for j in jobs]
        while not all(list(r.glob("checkpoint_*")) for r in runs):
            time.sleep(0.2)
        workers = cluster.alive("RayTrainWorker")
        if workers:
            killed.update(node=cluster.kill(workers[0]["node_id"]), at=cluster.now())

    thread = threading.Thread(target=killer, daemon=True) if kill_after_checkpoints else None
    t0 = time.perf_counter()
    if thread:
        thread.start()
    run_jobs(cfg, jobs, work / "partition", stage, tag, log=lambda m: None)
    seconds = time.perf_counter() - t0
    if thread:
        thread.join(timeout=5)
    results = {}
    for job in jobs:
        metrics = json.loads((stage / job["name"] / "metrics.json").read_text())
        results[job["name"]] = {"history": metrics["history"], "resumed_from_step": metrics["resumed_from_step"],
                                "steps": metrics["steps"], "weights": str(stage / job["name"] / "model")}
    return {"seconds": round(seconds, 1), "killed": killed, "jobs": results}


def scenario_experts(work: Path) -> dict:
    from lm_lexicon.seed_models import tiny_llama

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    seed = tiny_llama(work / "seed")
    _partition_dir(work / "partition")
    cluster = SimulatedCluster(3)
    try:
        report = {"uninterrupted": _run_experts(cluster, work, seed, "calm", False)}
        report["uninterrupted"]["placements"] = cluster.ran_on("RayTrainWorker")
        cluster.placements.clear()
        report["killed"] = _run_experts(cluster, work, seed, "storm", True)
        report["killed"]["placements"] = cluster.ran_on("RayTrainWorker")
        report["events"] = cluster.events
    finally:
        cluster.shutdown()
    return report


# =================================================================================================== serving
def scenario_serve(work: Path, pipeline_dir: Path) -> dict:
    """Serve on 2 serving nodes (the head holds the HTTP proxy, ingress, router and scorer); kill the node of
    Expert0's replica while requests for domain 0 are in flight."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from ray import serve

    sys.path.insert(0, str(REPO))
    from lm_lexicon.data.prompts import record_prompt
    from lm_lexicon.partition.routing import DomainRouter
    from serve_app.app import build_app

    cluster = SimulatedCluster(2, worker_resources={"serve_node": 1})
    report: dict = {}
    try:
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        on_head = {"num_cpus": 0, "resources": {"head_node": 0.01}}
        expert = {"num_cpus": 0, "resources": {"serve_node": 0.4}, "max_batch_size": 8, "max_ongoing_requests": 16,
                  "health_check_period_s": 2.0, "health_check_timeout_s": 10.0}
        args = {"output_dir": str(pipeline_dir),
                "ingress": {**on_head, "max_batch_size": 1, "max_ongoing_requests": 64},
                "router": {**on_head, "max_batch_size": 32, "max_ongoing_requests": 64},
                "scorer": {**on_head, "max_batch_size": 32, "max_ongoing_requests": 64}, "expert": expert,
                "generation": {"max_new_tokens": 8}, "auth_token_env": None, "retry_window_s": 120.0,
                "request_timeout_s": 240.0}
        t0 = time.perf_counter()
        serve.run(build_app(args), name="lexicon", route_prefix="/")
        report["deploy_s"] = round(time.perf_counter() - t0, 1)
        router = DomainRouter.load(pipeline_dir / "export" / "collapsed" / "router", load_embedder=True)
        from lm_lexicon.data.records import Record

        terms = ["river", "tree", "leaf", "rain", "hill", "lake", "bank", "loan", "tax", "price", "engine", "robot"]
        prompts = [record_prompt(Record(term=t, context="", definition="", source="api")) for t in terms]
        domain0 = [t for t, d in zip(terms, router.route_prompts(prompts)) if d == 0][:3]
        replicas = [a for a in cluster.alive("ServeReplica:lexicon:Expert0")]
        victim = replicas[0]["node_id"]
        report["replica_node_before"] = replicas[0]["node"]
        url = f"http://127.0.0.1:{port}"
        statuses, errors = [], []

        def one(i: int) -> None:
            try:
                r = httpx.post(f"{url}/v1/definitions", json={"items": [{"term": domain0[i % len(domain0)]}]},
                               timeout=300)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    assert r.json()["definitions"][0]["domain"] == 0
            except Exception as e:  # a dropped connection would be a lost request
                errors.append(repr(e))

        n_requests = 40
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(n_requests)]
            time.sleep(1.0)
            report["in_flight_at_kill"] = sum(not f.done() for f in futures)
            report["killed"] = cluster.kill(victim)
            t_kill = time.perf_counter()
            for f in futures:
                f.result()
        report["all_answered_s"] = round(time.perf_counter() - t_kill, 1)
        report.update(statuses=statuses, errors=errors, n_requests=n_requests)
        deadline = time.time() + 120
        while time.time() < deadline:
            after = cluster.alive("ServeReplica:lexicon:Expert0")
            if after and all(a["node_id"] != victim for a in after):
                break
            time.sleep(1)
        report["replica_node_after"] = [a["node"] for a in cluster.alive("ServeReplica:lexicon:Expert0")]
        r = httpx.post(f"{url}/v1/definitions", json={"items": [{"term": domain0[0]}]}, timeout=120)
        report["after_status"] = r.status_code
        report["retries"] = httpx.get(f"{url}/healthz", timeout=60).json()["stats"]["retries"]
        report["events"] = cluster.events
        serve.shutdown()
    finally:
        cluster.shutdown()
    return report


# =================================================================================================== N-scan
def scenario_scan(work: Path) -> dict:
    """The N-scan (one trial, N=2: the micro pipeline) on a head with no CPU and 3 worker nodes; the node of the
    trial is killed once its pipeline has finished the partition stage."""
    from lm_lexicon.experiments import expert_count_scan
    from lm_lexicon.seed_models import tiny_llama
    from micro_pipeline import micro_overrides

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    seed = tiny_llama(work / "seed")
    cluster = SimulatedCluster(3, head_cpus=0)  # the trial (0.01 CPU) and every stage run on worker nodes
    scan_dir = work / "scan"
    killed: dict = {}

    def killer() -> None:
        while not (scan_dir / "n2" / "partition" / "_SUCCESS.json").is_file():
            time.sleep(0.5)
        import ray

        mine = ray.get_runtime_context().get_job_id()  # the scan's trial, not the pipeline's expert trials
        trials = [t for t in cluster.alive("ImplicitFunc") if t["job"] == mine]
        if trials:
            killed.update(node=cluster.kill(trials[0]["node_id"]), at=cluster.now())

    thread = threading.Thread(target=killer, daemon=True)
    report: dict = {}
    try:
        thread.start()
        t0 = time.perf_counter()
        result = expert_count_scan("configs/tiny.yaml", micro_overrides(work / "run", seed), [2], scan_dir,
                                   trial_cpus=0.01, name="scan", log=lambda m: None)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        thread.join(timeout=5)
        import ray

        mine = ray.get_runtime_context().get_job_id()
        report.update(rows=result["rows"], killed=killed,
                      trials=[t for t in cluster.ran_on("ImplicitFunc") if t["job"] == mine],
                      events=cluster.events,
                      pipeline_log=(scan_dir / "n2" / "pipeline.log").read_text(errors="replace")[-20000:])
    finally:
        cluster.shutdown()
    return report


# =================================================================================================== autoscaling
EXPERT_NODE = {"CPU": 1, "expert_node": 1}  # cluster.yaml's gpu-train-* types in small: what training asks for
SERVE_NODE = {"CPU": 1, "serve_node": 1}    # cluster.yaml's gpu-serve-a10g in small: training never fits there


def _autoscaling_config(gcs_address: str) -> dict:
    """The fake multi-node provider's cluster config (Ray's fake_multi_node example, with our node types); worker
    types start at 0 like cluster.yaml's, idle ones go after 6 s (cluster.yaml: 10 minutes)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    return {
        "cluster_name": "lmlx-fake", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 1, "head_node": 1}, "node_config": {}, "max_workers": 0},
            "cpu-train": {"resources": {**EXPERT_NODE, "object_store_memory": 100 * MB}, "node_config": {},
                          "min_workers": 0, "max_workers": 2},
            "cpu-serve": {"resources": {**SERVE_NODE, "object_store_memory": 100 * MB}, "node_config": {},
                          "min_workers": 0, "max_workers": 1}},
        "head_node_type": FAKE_HEAD_NODE_TYPE, "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeTimeline:
    """When each node appeared and disappeared (``ray.nodes()`` every 0.5 s), and its node type."""

    def __init__(self):
        self.t0 = time.time()
        self.nodes: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                for n in ray.nodes():
                    res = n.get("Resources", {})
                    kind = "head" if "head_node" in res else "cpu-train" if "expert_node" in res else \
                        "cpu-serve" if "serve_node" in res else "?"
                    entry = self.nodes.setdefault(n["NodeID"], {"type": kind, "up": None, "down": None})
                    if n["Alive"] and entry["up"] is None:
                        entry["up"] = round(time.time() - self.t0, 1)
                    if not n["Alive"] and entry["down"] is None and entry["up"] is not None:
                        entry["down"] = round(time.time() - self.t0, 1)
            except Exception:
                pass
            self._stop.wait(0.5)

    def now(self) -> float:
        return round(time.time() - self.t0, 1)

    def workers_alive(self) -> int:
        return sum(1 for e in self.nodes.values() if e["type"] != "head" and e["up"] is not None and e["down"] is None)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=5)
        return sorted(({"node": k[-5:], **v} for k, v in self.nodes.items()), key=lambda e: e["up"] or 0)


def scenario_autoscale(work: Path) -> dict:
    """A head with the fake multi-node autoscaler; the experts stage (2 jobs at once) asks for expert_node workers;
    the autoscaler starts cpu-train nodes for them and removes them once idle; no cpu-serve node is started."""
    import subprocess

    import ray
    import yaml
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    from lm_lexicon.seed_models import tiny_llama

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # `ray start` turns token auth on when ~/.ray/auth_token exists (docs/RAY_JOBS.md "Token auth"), and then this
    # driver, which sends no token, could not join: a private cluster on loopback runs without it
    os.environ["RAY_AUTH_MODE"] = "disabled"
    seed = tiny_llama(work / "seed")
    _partition_dir(work / "partition")
    port = _free_port()
    address = f"{ray._private.services.get_node_ip_address()}:{port}"
    config = work / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(_autoscaling_config(address)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--resources={\"head_node\": 1}", f"--object-store-memory={100 * MB}",
                             f"--autoscaling-config={config}", "--disable-usage-stats", "--include-dashboard=false",
                             f"--temp-dir={os.environ['RAY_TMPDIR']}"],
                            env=env, stdout=open(work / "head.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        timeline = NodeTimeline()
        jobs = [{"name": "expert_0", "domain": 0}, {"name": "expert_1", "domain": 1}]
        cfg = _experts_cfg(work / "run", seed, work / "shared-storage")
        stage = work / "run" / "experts"
        stage.mkdir(parents=True)
        from lm_lexicon.train.stage import run_jobs

        started = timeline.now()
        run_jobs(cfg, jobs, work / "partition", stage, "auto", log=lambda m: None)
        finished = timeline.now()
        deadline = time.time() + 180  # idle nodes go after idle_timeout_minutes (6 s) + the autoscaler's rounds
        while timeline.workers_alive() and time.time() < deadline:
            time.sleep(1)
        released = timeline.now()
        nodes = timeline.stop()
        steps = {j["name"]: json.loads((stage / j["name"] / "metrics.json").read_text())["steps"] for j in jobs}
        return {"stage_started": started, "stage_finished": finished, "released_check": released, "nodes": nodes,
                "steps": steps}
    finally:
        ray.shutdown()
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()


SCENARIOS = {"experts": scenario_experts, "autoscale": scenario_autoscale, "serve": scenario_serve,
             "scan": scenario_scan}


def main(argv: list[str]) -> int:
    scenario, work = argv[0], Path(argv[1])
    report = SCENARIOS[scenario](work, *[Path(a) for a in argv[2:]])
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return 0


# =================================================================================================== tests
def _run_scenario(name: str, tmp_path: Path, timeout: float, *args: str) -> dict:
    from test_shutdown import Run

    run = Run([sys.executable, str(Path(__file__).resolve()), name, str(tmp_path), *args], tmp_path,
              env_extra={"RAY_TRAIN_V2_ENABLED": "1", "PYTHONPATH": os.pathsep.join(
                  [str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])})
    try:
        run.proc.wait(timeout=timeout)
    finally:
        run.cleanup()
    assert run.proc.returncode == 0, run.log()[-6000:]
    return json.loads((tmp_path / "report.json").read_text())


def _close(a: float, b: float, rtol: float = 1e-6) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


@pytest.mark.slow
@pytest.mark.ray
def test_experts_spread_over_nodes_and_survive_a_killed_node(tmp_path):
    from safetensors.torch import load_file

    report = _run_scenario("experts", tmp_path, timeout=1800)
    calm, storm = report["uninterrupted"], report["killed"]
    for run in (calm, storm):
        nodes = {p["node"] for p in run["placements"]}
        assert "head" not in nodes and nodes, run["placements"]  # the head takes no training work
    calm_nodes = [p for p in calm["placements"]]
    # side by side on two nodes: two training workers alive at once, on different nodes
    overlap = [(a, b) for i, a in enumerate(calm_nodes) for b in calm_nodes[i + 1:]
               if a["node"] != b["node"] and a["first"] < b["last"] and b["first"] < a["last"]]
    assert overlap, calm_nodes
    assert storm["killed"], "no node was killed"
    victim = storm["killed"]["node"]
    after = [p for p in storm["placements"] if p["first"] > storm["killed"]["at"]]
    assert after and all(p["node"] not in (victim, "head") for p in after), (victim, storm["placements"])
    resumed = [name for name, job in storm["jobs"].items() if job["resumed_from_step"] > 0]
    assert resumed, storm["jobs"]
    for name, job in storm["jobs"].items():
        ref = calm["jobs"][name]
        assert job["steps"] == ref["steps"] == STEPS
        for h, r in zip(job["history"], ref["history"]):
            assert h["step"] == r["step"]
            for key in ("train_loss", "valid_loss"):
                assert _close(h[key], r[key]), (name, h, r)
        w, ref_w = (load_file(str(Path(p) / "model.safetensors")) for p in (job["weights"], ref["weights"]))
        assert all(_close_tensors(w[k], ref_w[k]) for k in ref_w), name
    timeline = "; ".join(f"{e['t']:.0f}s {e['event']} {e['node']}" for e in report["events"])
    print(f"\nuninterrupted: {calm['seconds']}s; with {victim} killed at {storm['killed']['at']}s: "
          f"{storm['seconds']}s, resumed {resumed} from step "
          f"{[storm['jobs'][n]['resumed_from_step'] for n in resumed]}; nodes: {timeline}; placements: "
          f"{[(p['node'], p['first'], p.get('last')) for p in storm['placements']]}")


def _close_tensors(a, b, rtol: float = 1e-6) -> bool:
    import torch

    return torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-8)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


@pytest.mark.slow
@pytest.mark.ray
def test_autoscaler_starts_training_nodes_for_the_experts_and_releases_them(tmp_path):
    report = _run_scenario("autoscale", tmp_path, timeout=1800)
    nodes = report["nodes"]
    train = [n for n in nodes if n["type"] == "cpu-train"]
    assert [n["type"] for n in nodes if n["type"] == "head"] == ["head"]
    assert not [n for n in nodes if n["type"] == "cpu-serve"], nodes  # training never asks for a serving node
    assert 1 <= len(train) <= 2, nodes  # cpu-train: max_workers 2
    assert all(report["stage_started"] <= n["up"] <= report["stage_finished"] for n in train), report
    assert all(n["down"] is not None and n["down"] >= report["stage_finished"] for n in train), report
    assert report["steps"] == {"expert_0": STEPS, "expert_1": STEPS}
    timeline = "; ".join(f"{n['type']} {n['node']}: up {n['up']}s, down {n['down']}s" for n in nodes)
    print(f"\nexperts stage {report['stage_started']}s-{report['stage_finished']}s; nodes: {timeline}")


@pytest.mark.slow
@pytest.mark.ray
def test_killed_serving_node_loses_no_request_and_its_replica_moves(tmp_path, pipeline_dir):
    report = _run_scenario("serve", tmp_path, 900, str(pipeline_dir))
    statuses = report["statuses"]
    assert report["errors"] == [] and len(statuses) == report["n_requests"], report  # every request answered
    assert statuses.count(200) == report["n_requests"], report  # none lost: the ingress retried them
    assert report["in_flight_at_kill"] > 0 and report["retries"] > 0, report
    assert report["replica_node_after"] and report["killed"] not in report["replica_node_after"], report
    assert report["after_status"] == 200
    print(f"\nserving node kill: {report['killed']} (Expert0's replica) killed with {report['in_flight_at_kill']} of "
          f"{report['n_requests']} requests in flight; all answered 200 within {report['all_answered_s']}s of the "
          f"kill ({report['retries']} ingress retries); replica now on {report['replica_node_after']}; "
          f"deploy took {report['deploy_s']}s")


@pytest.mark.slow
@pytest.mark.ray
def test_scan_trial_whose_node_died_is_retried(tmp_path):
    report = _run_scenario("scan", tmp_path, 2400)
    assert report["killed"], "the trial's node was not killed"
    victim, at = report["killed"]["node"], report["killed"]["at"]
    trials = report["trials"]
    assert any(t["node"] == victim for t in trials), trials  # the trial ran there
    retried = [t for t in trials if t["first"] > at]
    assert retried and all(t["node"] not in (victim, "head") for t in retried), trials  # and again elsewhere
    (row,) = report["rows"]
    assert row["n"] == 2 and "moe_bleu_a" in row  # the retried trial finished the pipeline and reported
    log = report["pipeline_log"]
    for stage in ("data", "partition"):  # finished before the kill: reused by the retry, not recomputed
        assert f"[{stage}] reusing" in log, log[-3000:]
    print(f"\nscan: trial node {victim} killed at {at}s (after the partition stage); trial retried on "
          f"{[t['node'] for t in retried]}, scan finished in {report['seconds']}s; row {row}")
