#!/usr/bin/env bash
# Installs everything stillpoint's demo, tests and benchmarks need on a fresh Debian 12 machine.
# Idempotent: packages already present are left alone. Uses sudo when not run as root.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Debian 12's QEMU; a newer qemu-utils may be preinstalled and conflict with it, so both are
# installed together at the bookworm version.
PACKAGES=(
  qemu-system-x86 "qemu-utils/bookworm"  # the hypervisor and qemu-img/qemu-nbd (test bed, restore to qcow2)
  e2fsprogs cpio                          # building the test guest's disks and initramfs
  restic borgbackup                       # peers measured side by side in `stillpoint bench repo`
  sqlite3                                 # checking restored databases in the recipe tests
  libnbd-bin                              # nbdinfo / nbdcopy: peers the NBD client is checked against
)

need_install=0
for p in qemu-system-x86 e2fsprogs cpio restic borgbackup sqlite3 libnbd-bin; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_install=1
done
qemu_img_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
case "$qemu_img_version" in 1:7.2*) ;; *) need_install=1 ;; esac

if [ "$need_install" = 1 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --allow-downgrades --no-install-recommends "${PACKAGES[@]}"
fi

# The test guest is built from Debian packages fetched with `apt-get download` (no root needed),
# which needs package lists that know them.
if ! apt-cache show linux-image-cloud-amd64 busybox-static qemu-guest-agent sqlite3 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not installed; install Rust from https://rustup.rs first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
