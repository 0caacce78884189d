#!/usr/bin/env bash
# Installs the Debian 12 packages the test suite and the benchmarks talk to (real daemons, not
# mocks). Idempotent and quick when everything is already there: apt runs only for what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # SLURM cluster for the adapter and balancer tests
  slurmctld slurmd slurm-client munge
  # IPMI second client, sshd for the SSH power driver
  ipmitool openssh-server
  # network boot of VMs (end-to-end), the tiny test image
  qemu-system-x86 ipxe ipxe-qemu busybox-static cpio
  # the Debian images (slurm, k8s): their root is made by mmdebstrap, packed by mksquashfs
  mmdebstrap squashfs-tools
  # the k8s image's container images (pause from C, busybox), the containerd they are tried in,
  # and the CNI plugins its pod network config is tried with
  gcc libc6-dev containerd runc containernetworking-plugins iptables
  # Redfish: libvirtd runs the VMs sushy-emulator's libvirt driver powers; the venv's
  # libvirt-python is built against libvirt-dev (pkg-config, gcc, the Python headers)
  libvirt-daemon-system libvirt-dev pkg-config python3-dev
  # `make venv` (Debian's python3 has no ensurepip without it); pgrep for the VM/demo checks
  python3-venv procps
  # boot-storm benchmark baseline and load generator
  nginx-light wrk
  sqlite3 curl ca-certificates
  # the PostgreSQL store: its tests run a throw-away server (initdb, postgres)
  postgresql
  # /metrics scraped by a real Prometheus, promtool checks the example alert rules
  prometheus
  # a boot server whose clock is behind the balancer's (libfaketime under `provisioner serve`)
  faketime
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: missing Debian packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "install-system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "install-system-deps: ok"
