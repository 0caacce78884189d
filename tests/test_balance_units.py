"""Pure checks of balancer details that the integration tests (test_balance_switch/safety) rely on."""

from provisioner.model import Policy
from provisioner.policy import PendingPod, SharedNode, Snapshot, decide
from testbed.simnodes import kernel_args


def test_demand_persist_zero_moves_on_first_sight():
    # demand_persist_s: 0 switches persistence off: the first pass that sees demand acts on it.
    policy = Policy(demand_persist_s=0, cooldown_s=0)
    node = SharedNode("sn01", "slurm", cpus=4, k8s_labels=(("sched", "k8s"),))
    snap = Snapshot(now=1000.0, policy=policy, nodes=(node,), pods=(PendingPod("ml", "p0", cpu_m=500),),
                    demand_since={"slurm": None, "k8s": None})
    assert [(m.node, m.to_role) for m in decide(snap).moves] == [("sn01", "k8s")]


def test_kernel_args_of_a_node_script_and_of_the_unknown_node_script():
    script = ("#!ipxe\nimgfree\nkernel --name kernel http://b/images/k8s/vmlinuz console=ttyS0 "
              "provisioner.node=sn01 provisioner.role=k8s provisioner.callback=http://b/api/v1/nodes/sn01/booted "
              "provisioner.token=t0k || goto failed\n")
    args = kernel_args(script)
    assert args["provisioner.role"] == "k8s" and args["provisioner.token"] == "t0k"
    assert args["provisioner.callback"] == "http://b/api/v1/nodes/sn01/booted"
    assert kernel_args("#!ipxe\necho provisioner: unknown MAC\nsleep 10\n") == {}


def test_pass_lock_waits_only_when_asked(tmp_path):
    """cron's passes give up at once on a held lock; `role --now` waits for the pass to end."""
    import threading

    import pytest

    from provisioner import config
    from provisioner.reconcile import PassLocked, pass_lock
    from testbed.site import write_site

    site = config.load(write_site(tmp_path))
    held, release = threading.Event(), threading.Event()

    def holder():
        with pass_lock(site):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with pytest.raises(PassLocked):
        with pass_lock(site):
            pass
    threading.Timer(0.3, release.set).start()
    with pass_lock(site, wait_s=10):
        assert release.is_set()
    t.join(5)
