"""Small in-process stand-ins for the two clusters and for power control, implementing the
Protocols of provisioner/clusters/interfaces.py, for the fast tests of the state machine
(test_states.py). They keep a plain state that a test sets and reads; every call is recorded.
The real adapters are tested against the real daemons elsewhere; these only let a table of
transitions run in milliseconds."""

from __future__ import annotations

from dataclasses import replace

from provisioner.clusters.kubernetes import EvictionResult, KubeNode, PodOnNode
from provisioner.clusters.slurm import PAPER_REASON, RequeueResult, RunningJob, SlurmNode, SlurmSnapshot
from provisioner.errors import OperationError
from provisioner.power.dispatch import PowerResult

OURS = "provisioner: switching"


class Refusals:
    """`refuse[op] = message`: the fake raises OperationError(message) on that call, as a real
    adapter does when its cluster refuses (a webhook, RBAC, slurmctld down)."""

    refuse: dict[str, str]

    def _check(self, op: str) -> None:
        if op in self.refuse:
            raise OperationError(self.refuse[op])


class FakeSlurm(Refusals):
    def __init__(self, **nodes: SlurmNode):
        self.state: dict[str, SlurmNode] = dict(nodes)
        self.calls: list[tuple] = []
        self.refuse = {}
        self.resume_leaves_not_responding = False  # slurmctld pings a resumed node first
        self.jobs: dict[str, list[RunningJob]] = {}  # node -> the jobs holding it (see run_job)
        self.pending: list = []  # clusters.slurm.PendingJob: the queue observe() shows

    def run_job(self, name: str, job_id: str, requeue: bool = True, **kw) -> None:
        """A job starts on the node: it is busy (allocated) until the job ends or is requeued."""
        self.jobs.setdefault(name, []).append(RunningJob(job_id, "RUNNING", (name,), requeue, True, **kw))
        self.set(name, state="allocated", alloc_cpus=self.state[name].cpus)

    def end_job(self, name: str, job_id: str) -> None:
        self.jobs[name] = [j for j in self.jobs.get(name, []) if j.job_id != job_id]
        if not self.jobs[name]:
            self.set(name, state="down" if self.state[name].down else "idle", alloc_cpus=0)

    def set(self, name: str, **changes) -> None:
        self.state[name] = replace(self.state[name], **changes)

    def observe(self) -> SlurmSnapshot:
        self._check("observe")
        return SlurmSnapshot(dict(self.state), tuple(self.pending))

    def nodes(self, names=None) -> dict[str, SlurmNode]:
        self._check("nodes")
        names = [names] if isinstance(names, str) else names
        return {n: self.state[n] for n in (names if names is not None else self.state)}

    def drain(self, nodes, reason: str) -> dict[str, SlurmNode]:
        self._check("drain")
        self.calls.append(("drain", tuple(nodes), reason))
        for n in nodes:
            self.set(n, flags=self.state[n].flags | {"drain"}, reason=f"provisioner: {reason}", reason_is_ours=True)
        return self.nodes(nodes)

    def down(self, nodes, reason: str = PAPER_REASON) -> dict[str, SlurmNode]:
        self._check("down")
        self.calls.append(("down", tuple(nodes)))
        for n in nodes:
            self.set(n, state="down", flags=self.state[n].flags - {"drain"}, reason=reason, reason_is_ours=True)
        return self.nodes(nodes)

    def resume(self, nodes) -> dict[str, SlurmNode]:
        self._check("resume")
        self.calls.append(("resume", tuple(nodes)))
        for n in nodes:
            flags = frozenset({"not_responding"}) if self.resume_leaves_not_responding else frozenset()
            keep = self.state[n].flags & {"powered_down", "powering_up"}  # resume keeps the power state
            self.set(n, state="idle", flags=flags | keep, reason=None, reason_is_ours=False)
        return self.nodes(nodes)

    def power_down(self, nodes) -> dict[str, SlurmNode]:
        self._check("power_down")
        self.calls.append(("power_down", tuple(nodes)))
        for n in nodes:
            self.set(n, flags=(self.state[n].flags - {"powering_up"}) | {"powered_down"})
        return self.nodes(nodes)

    def power_up(self, nodes) -> dict[str, SlurmNode]:
        self._check("power_up")
        self.calls.append(("power_up", tuple(nodes)))
        for n in nodes:
            if "powered_down" in self.state[n].flags:
                self.set(n, flags=self.state[n].flags | {"powering_up"})
        return self.nodes(nodes)


    def jobs_on(self, node: str) -> list[RunningJob]:
        self._check("jobs_on")
        return list(self.jobs.get(node, []))

    def requeue_jobs_on(self, node: str) -> RequeueResult:
        self._check("requeue")
        self.calls.append(("requeue", node))
        current = self.state[node]
        if not ((current.drain or current.down) and current.reason_is_ours):
            raise OperationError(f"node {node} is not drained by provisioner: drain it before requeueing its jobs")
        jobs = self.jobs_on(node)
        todo = tuple(j.job_id for j in jobs if j.requeueable)
        kept = tuple((j.job_id, j.why_not_requeueable) for j in jobs if not j.requeueable)
        for job_id in todo:
            self.end_job(node, job_id)
        return RequeueResult(node, todo, kept, tuple(j.job_id for j in self.jobs_on(node)))


class FakeKube(Refusals):
    def __init__(self, **nodes: KubeNode):
        self.state: dict[str, KubeNode] = dict(nodes)
        self.calls: list[tuple] = []
        self.refuse = {}
        self.evictable = True  # False: a PodDisruptionBudget refuses every eviction
        self.pending: list = []  # clusters.kubernetes.PendingPod: what pending_pods() shows

    def set(self, name: str, **changes) -> None:
        self.state[name] = replace(self.state[name], **changes)

    def pending_pods(self) -> list:
        self._check("pending_pods")
        return list(self.pending)

    def nodes(self, names=None) -> dict[str, KubeNode]:
        return {n: k for n, k in self.state.items() if names is None or n in set(names)}

    def node(self, name: str) -> KubeNode | None:
        self._check("node")
        return self.state.get(name)

    def cordon(self, name: str) -> bool:
        self._check("cordon")
        self.calls.append(("cordon", name))
        k = self.state[name]
        if k.unschedulable:
            return k.cordoned_by_us
        self.set(name, unschedulable=True, cordoned_by_us=True)
        return True

    def uncordon(self, name: str) -> None:
        self._check("uncordon")
        self.calls.append(("uncordon", name))
        k = self.state[name]
        if k.unschedulable and not k.cordoned_by_us:
            raise OperationError(f"node {name} was cordoned by someone else")
        self.set(name, unschedulable=False, cordoned_by_us=False)

    def label(self, name: str, role: str) -> None:
        self._check("label")
        self.calls.append(("label", name, role))
        self.set(name, role=role)

    def mark_hold(self, name: str, reason: str | None) -> None:
        self._check("mark_hold")
        self.calls.append(("mark_hold", name, reason))
        self.set(name, hold=reason)

    def evict_pods(self, name: str) -> EvictionResult:
        self._check("evict")
        self.calls.append(("evict", name))
        pods = tuple(p.key for p in self.state[name].pods)
        if not self.evictable:
            return EvictionResult(name, (), tuple((p, "Cannot evict pod as it would violate the pod's disruption "
                                                      "budget.") for p in pods), pods)
        self.set(name, pods=())
        return EvictionResult(name, pods, (), ())

    def sign_kubelet_csr(self, node: str, csr_pem: bytes, signer: str, usages: tuple[str, ...],
                         wait_s: float) -> bytes:
        """Signs with a throwaway CA for a day, as the signer would (the real one: test_kubelet_certs)."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self._check("sign_kubelet_csr")
        self.calls.append(("sign_kubelet_csr", node))
        req = x509.load_pem_x509_csr(csr_pem)
        ca = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(req.subject)
                .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "fake-ca")]))
                .public_key(req.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .sign(ca, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def close(self) -> None:
        pass


class FakePower:
    def __init__(self, ok: bool = True, error: str = "BMC did not answer within 5s (2 attempts)"):
        self.ok, self.error = ok, error
        self.calls: list[tuple] = []

    def __call__(self, site, nodes, action, *, netboot=False, **kwargs) -> list[PowerResult]:
        self.calls.append((action, tuple(n.name for n in nodes), netboot))
        return [PowerResult(n.name, action, self.ok, state="on" if self.ok else None, method="ipmi",
                            netboot=netboot, error=None if self.ok else self.error,
                            error_kind=None if self.ok else "timeout") for n in nodes]


def slurm_node(name: str, state: str = "idle", **kw) -> SlurmNode:
    return SlurmNode(name=name, state=state, cpus=4, memory_mb=16000, partitions=("batch",), **kw)


def kube_node(name: str, ready: bool = True, role: str | None = "k8s", pods: tuple[str, ...] = (), **kw) -> KubeNode:
    return KubeNode(name=name, ready=ready, unschedulable=kw.pop("unschedulable", False),
                    cordoned_by_us=kw.pop("cordoned_by_us", False), role=role, labels=(), taints=(), cpu_m=4000,
                    memory=16 << 30, gpus=0,
                    pods=tuple(PodOnNode("default", p, "Running", False) for p in pods),
                    ready_reason="KubeletReady" if ready else "NodeStatusUnknown", boot_id=kw.pop("boot_id", "boot-1"),
                    **kw)
