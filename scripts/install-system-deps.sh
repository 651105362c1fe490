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
)

missing=()
for cmd in "${!NEEDED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDED[$cmd]}")
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
