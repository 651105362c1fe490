#!/usr/bin/env bash
# Install the Debian packages the test suite and benchmarks need, when a command is missing.
# As root it installs them with apt-get; otherwise it says what is missing and fails.
set -euo pipefail

# command -> Debian package
declare -A NEEDED=(
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [xz]=xz-utils
  [gzip]=gzip
  [losetup]=mount
  [curl]=curl
  [nginx]=nginx
  [openssl]=openssl
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [umoci]=umoci
  [htpasswd]=apache2-utils
  # guest inspection: disks built by the tests, and booted under TCG to prove the verdicts
  [sgdisk]=gdisk
  [sfdisk]=fdisk
  [mkfs.vfat]=dosfstools
  [mcopy]=mtools
  [mkntfs]=ntfs-3g
  [wimlib-imagex]=wimtools
  [hivexregedit]=libwin-hivex-perl
  [hivexsh]=libhivex-bin
  [grub-mkimage]=grub-common
  [syslinux]=syslinux
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [cpio]=cpio
  [mkfs.exfat]=exfatprogs
  [xorriso]=xorriso
  [mkudffs]=udftools
  [cryptsetup]=cryptsetup-bin
  [mdadm]=mdadm
  [pvcreate]=lvm2
  [mkfs.xfs]=xfsprogs
  [mkfs.btrfs]=btrfs-progs
  [zstd]=zstd   # initramfs images compressed as dracut and initramfs-tools do
  [lz4]=lz4
  [sbsign]=sbsigntool
)
# file -> Debian package, for packages that ship no command of their own
declare -A NEEDED_FILES=(
  [/usr/lib/grub/i386-pc/boot.img]=grub-pc-bin
  [/usr/lib/grub/x86_64-efi/moddep.lst]=grub-efi-amd64-bin
  [/usr/share/OVMF/OVMF_CODE_4M.ms.fd]=ovmf
  [/usr/share/seabios/bios-256k.bin]=seabios
  [/usr/lib/syslinux/mbr/mbr.bin]=syslinux-common
  [/usr/lib/ipxe/qemu/efi-virtio.rom]=ipxe-qemu
)

missing=()
for cmd in "${!NEEDED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDED[$cmd]}")
done
for file in "${!NEEDED_FILES[@]}"; do
  [ -e "$file" ] || missing+=("${NEEDED_FILES[$file]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${packages[*]}; install them (as root: apt-get install ${packages[*]})" >&2
  exit 1
fi
echo "installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
