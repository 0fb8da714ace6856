"""funcdp.federated.flower across Flower's own processes: a SuperLink, SuperNodes, `flwr run`.

The processes run on 127.0.0.1 (free ports), are started here and ended at the end of the module,
also on failure, with their whole process tree. The Flower App is tests/flower_app; its server
saves what each round released, and the tests recompute the same rounds in-process.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")


import funcdp as fdp  # noqa: E402
from funcdp.federated import make_client_update, make_round, make_server_update  # noqa: E402
from funcdp.federated.flower import SecAggPlus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "flower_app"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(APP))
from funcdp_flower_app import task  # noqa: E402

DEFAULTS = task.run_config_defaults()


class Federation:
    """A SuperLink and `num_nodes` SuperNodes (partition-id 0..n-1) as real processes."""

    def __init__(self, workdir: Path, num_nodes: int) -> None:
        self.workdir, self.processes = workdir, []
        home = workdir / "flwr-home"
        home.mkdir(parents=True)
        pythonpath = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        # Flower's processes start others by name (the SuperLink runs `flower-superexec`): this
        # interpreter's scripts come first on PATH, as in an activated environment.
        path = [str(BIN), os.environ.get("PATH", "")]
        self.env = dict(
            os.environ,
            PATH=os.pathsep.join(filter(None, path)),
            PYTHONPATH=os.pathsep.join(filter(None, pythonpath)),
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            OMP_NUM_THREADS="1",
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
        )
        port = _free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        link = self._start(
            "superlink",
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation"]
            + ["--port", str(port)],
        )
        _wait_for_port(port, link, timeout=120)
        for node in range(num_nodes):
            self._start(
                f"supernode-{node}",
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}"]
                + ["--port", str(_free_port()), "--node-config", f"partition-id={node}"],
            )

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                [str(BIN / command[0]), *command[1:]],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def run(self, overrides: dict, *, timeout: float) -> str:
        """Runs the app to its end (`flwr run --stream`) and returns its output."""
        config = " ".join(f"{key}={_toml(value)}" for key, value in overrides.items())
        command = [str(BIN / "flwr"), "run", str(APP), "test", "--stream", "--run-config", config]
        try:
            result = subprocess.run(
                command, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as error:
            raise AssertionError(f"flwr run timed out:\n{error.output}\n{self.logs()}") from error
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"flwr run failed:\n{output}\n{self.logs()}"
        return output

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> list[int]:
        """Ends every process started here and all below them; returns any still alive."""
        tree = _descendants([process.pid for process in self.processes])
        for pid in tree:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _alive(tree):
            _signal(pid, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=10)
        return _alive(tree)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    nodes = Federation(tmp_path_factory.mktemp("flower"), num_nodes=3)
    try:
        yield nodes
    finally:
        leftover = nodes.stop()
    assert not leftover, f"processes still alive after the test: {leftover}"


def in_process_rounds(state, config, partitions):
    """funcdp's round on the same clients, key and state, in this process, two ways.

    `make_round` over all partitions with a mask of the ones in the round (the simulation), and
    its halves `make_client_update` / `make_server_update` with each update scaled by the
    SecAgg+ margin, as FuncdpClient does. Returns both new states and the scaled clipped sum.
    """
    privatizer, optimizer = task.privatizer(config), task.server_optimizer()
    datasets = [task.client_data(p, config["seed"]) for p in range(config["num-clients"])]
    clients = fdp.Batch(
        inputs=tuple(torch.stack(column) for column in zip(*datasets, strict=True)),
        mask=torch.tensor([p in partitions for p in range(config["num-clients"])]),
    )
    via_round, _ = make_round(task.local_update, privatizer, optimizer)(state, clients)
    coordinates = sum(p.numel() for p in state.params.values())
    scale = SecAggPlus().update_scale(config["clip-norm"], num_coordinates=coordinates)
    client_update = make_client_update(task.local_update, privatizer)
    total = None
    for partition in partitions:
        clipped = client_update(state.params, datasets[partition])
        scaled = {name: value.double() * scale for name, value in clipped.items()}
        total = scaled if total is None else {k: total[k] + scaled[k] for k in total}
    total = {name: value.float() for name, value in total.items()}
    via_halves = make_server_update(privatizer, optimizer)(state, total)
    return via_round, via_halves, total, 1 - scale


def check_rounds(records, config, partitions_per_round):
    """Each record equals funcdp's in-process round; returns the noise it released, over sigma C.

    The app's server optimizer is SGD with learning rate 1, so a round moves the parameters by
    minus its privatized update, (clipped sum + noise) / expected clients.
    """
    state = task.initial_state(config)
    expected = config["sample-rate"] * config["num-clients"]
    clip_norm, sigma = config["clip-norm"], config["noise-multiplier"]
    noise = []
    for record, partitions in zip(records, partitions_per_round, strict=True):
        assert record["clients"] == len(partitions)
        # Each round starts from the server's parameters (the last round's rounding included).
        torch.testing.assert_close(record["params"], state.params, rtol=0, atol=2e-6)
        state = state._replace(params=record["params"])
        via_round, via_halves, total, shrink = in_process_rounds(state, config, partitions)
        # SecAgg+ moves each client's coordinates by less than one step 2C/T (bound < 2e-7
        # here); float32 rounding of the sum and the noise adds a few ulps on either side.
        bound = SecAggPlus().error_bound(clip_norm, clients=len(partitions)) / expected
        for name, new in record["new_params"].items():
            largest = float(max(new.abs().max(), total[name].abs().max() / expected))
            slack = 8 * torch.finfo(torch.float32).eps * largest
            error = (new - via_halves.params[name]).abs().max().item()
            assert error <= bound + slack, (record["round"], name, error, bound, slack)
            # make_round has no SecAgg+ margin: its clipped sum is larger by a factor 1/(1-shrink).
            margin = shrink / (1 - shrink) * total[name].abs().max().item() / expected
            error = (new - via_round.params[name]).abs().max().item()
            assert error <= bound + slack + margin, (record["round"], name, error, margin)
            if sigma > 0:
                released = (record["params"][name] - new) * expected - total[name]
                noise.append(released.flatten() / (sigma * clip_norm))
        assert record["ledger"] == via_round.ledger == via_halves.ledger
        state = via_round
    return noise


def flower_epsilon(sigma: float, delta: float, *, clients: int) -> float:
    """Flower 1.42's own RDP accountant on one round of all `clients` (no sampling)."""
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    event = GaussianPrivacyEvent(
        noise_multiplier=sigma, sample_size=clients, population_size=clients
    )
    accountant.compose(event)
    return accountant.get_privacy_spent().epsilon


def test_dp_fedavg_over_secagg_with_noise_a_dropout_and_the_budget(federation, tmp_path):
    """Round 1: noise on, partition 2 drops out after the key exchange; round 2: over budget."""
    config = dict(DEFAULTS, **{"drop-partition": 2, "drop-round": 1})
    sigma, delta = config["noise-multiplier"], config["delta"]
    spent = [
        fdp.dpsgd_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=s, delta=delta)
        for s in (1, 2)
    ]
    config["max-epsilon"] = (spent[0] + spent[1]) / 2
    output = federation.run(dict(config, **{"trace-dir": str(tmp_path)}), timeout=300)
    assert "budget reached" in output, output

    record = torch.load(tmp_path / "round-1.pt", weights_only=False)
    assert not (tmp_path / "round-2.pt").exists()  # refused before any client was asked
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["step"] == 1 and final["ledger"].steps == 1
    assert record["epsilon"] == pytest.approx(spent[0], rel=1e-9)
    # the same event by RDP, as Flower's own accountant computes it (the log shows PLD's)
    by_rdp = fdp.dpsgd_epsilon(
        noise_multiplier=sigma, sample_rate=1.0, steps=1, delta=delta, method="rdp"
    )
    assert by_rdp == pytest.approx(flower_epsilon(sigma, delta, clients=3), rel=1e-9)
    noise = check_rounds([record], config, [[0, 1]])  # the round goes on without partition 2

    # The released update's noise is N(0, (sigma C)^2) on each of its 1002 coordinates.
    from scipy import stats

    noise = torch.cat(noise).double().numpy()
    assert noise.size == 1002
    assert abs(noise.std() - 1.0) < 0.1 and abs(noise.mean()) < 0.15
    assert stats.kstest(noise, "norm").pvalue > 1e-3


@pytest.mark.slow
def test_dp_fedavg_over_secagg_without_noise_equals_funcdp_for_three_rounds(federation, tmp_path):
    """Noise off: three rounds, each equal to the in-process round up to SecAgg+'s rounding."""
    config = dict(DEFAULTS, **{"num-server-rounds": 3, "noise-multiplier": 0.0})
    federation.run(dict(config, **{"trace-dir": str(tmp_path)}), timeout=600)
    records = [torch.load(tmp_path / f"round-{r}.pt", weights_only=False) for r in (1, 2, 3)]
    assert [r["epsilon"] for r in records] == [math.inf] * 3
    check_rounds(records, config, [[0, 1, 2]] * 3)
    assert torch.load(tmp_path / "final.pt", weights_only=False)["ledger"].steps == 3


@pytest.mark.slow
def test_a_supernode_killed_between_rounds_is_waited_for_and_left_out(tmp_path):
    """Four SuperNodes; after round 1 one is killed (its process tree): round 2 waits for it in
    SecAgg+'s first stage until the timeout, goes on with three, and the ledger counts both."""
    nodes = Federation(tmp_path / "processes", num_nodes=4)
    trace = tmp_path / "trace"
    trace.mkdir()
    config = dict(DEFAULTS, **{"num-clients": 4, "trace-dir": str(trace)})
    outputs = []
    try:
        run = threading.Thread(target=lambda: outputs.append(nodes.run(config, timeout=800)))
        run.start()
        deadline = time.monotonic() + 400
        while not (trace / "round-1.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        victim = nodes.processes[4]  # supernode-3 (partition 3)
        for pid in _descendants([victim.pid]):
            _signal(pid, signal.SIGKILL)
        victim.wait(timeout=10)
        run.join(timeout=800)
        print(outputs)
    finally:
        leftover = nodes.stop()
    assert not leftover and outputs
    records = [torch.load(trace / f"round-{r}.pt", weights_only=False) for r in (1, 2)]
    check_rounds(records, config, [[0, 1, 2, 3], [0, 1, 2]])
    assert torch.load(trace / "final.pt", weights_only=False)["ledger"].steps == 2


def test_import_funcdp_does_not_import_flower():
    code = "import sys, funcdp, funcdp.federated; assert 'flwr' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=300).returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args[0]} exited with {process.returncode}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _descendants(roots: list[int]) -> list[int]:
    """The roots and every process below them, from `ps` (Linux and macOS)."""
    table = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in table.stdout.split("\n"):
        if line.strip():
            pid, ppid = (int(field) for field in line.split())
            children.setdefault(ppid, []).append(pid)
    found, stack = [], list(roots)
    while stack:
        found.append(stack.pop())
        stack.extend(children.get(found[-1], []))
    return found


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` that still run (zombies, already ended, do not count)."""
    states = subprocess.run(["ps", "-A", "-o", "pid=,stat="], capture_output=True, text=True)
    running = {
        int(pid)
        for pid, stat in (line.split() for line in states.stdout.split("\n") if line.strip())
        if not stat.startswith("Z")
    }
    return [pid for pid in pids if pid in running]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
