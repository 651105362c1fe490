"""The ``diskport`` command line: parses, calls the library, renders progress and errors.

Errors the library raises on purpose (:class:`~diskport.errors.DiskportError`) become one line on stderr and
exit code 1 (2 for usage). Ctrl-C exits 130 and SIGTERM 143, after the same cleanup as any failure.

Start-up is kept light: this module imports click and diskport's small modules only; each command imports what
it needs when it runs (numpy, httpx, rich, the readers, the oci package), and the option choices come from
:mod:`diskport.names`, so ``--version`` and ``--help`` load none of them (tests/test_startup.py checks it).

It is longer than the house's 600 lines because it is a flat list of the commands' option declarations and
their thin bodies (each a few lines that call the library and render its result); splitting it by command
would put the shared option decorators and error handling in a third place and make ``--help`` import more.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from diskport.errors import DiskportError, UsageError, safe_text
from diskport.names import DEFAULT_TARGET, MANIFEST_TARGETS, OUTPUT_FORMATS, format_names
from diskport.signals import Interrupted, terminate_raises
from diskport.units import human_size, parse_size
from diskport.version import __version__

if TYPE_CHECKING:
    from diskport.progress import JobProgress

P = ParamSpec("P")
R = TypeVar("R")
#: Where registry_options leaves --pull-secret in the click context for _registry.
PULL_SECRET = "diskport.pull_secret"


def fail(message: str, code: int) -> None:
    click.echo(f"diskport: {safe_text(message)}", err=True)
    sys.exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with terminate_raises():
                return func(*args, **kwargs)
        except DiskportError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; nothing was left behind", 130)
        except Interrupted as e:
            fail(f"{e}; nothing was left behind", 128 + e.signum)
        except OSError as e:
            fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        raise AssertionError("unreachable")

    return wrapper


def _pin_malloc_mmap_threshold() -> None:
    """Keep large buffers in their own mappings, returned to the system when freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a large mapped buffer is freed, after which
    multi-MiB buffers (xz blocks, windows) come from heap arenas that fragment and do not shrink: measured on a
    4 GiB qcow2.xz, peak RSS 304 MiB with the default, 190 MiB with the threshold pinned at 1 MiB. Only the
    command line does this: it owns its process, a library user owns theirs.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def _one_blas_thread() -> None:
    """Keep numpy's OpenBLAS from starting a thread per CPU when it is imported.

    diskport uses numpy for table bookkeeping, never for linear algebra, yet OpenBLAS starts its thread pool at
    import: measured on these 2-CPU VMs, ``diskport inspect disk.qcow2`` took 248 ms of user CPU with the pool
    and 156 ms with one thread, at the same wall time. Set before a command imports numpy (the commands import
    it lazily); a value the user set is kept. Only the command line does this, as with malloc above.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _help_width() -> int:
    """The width click's help takes by default, from ``shutil.get_terminal_size()`` (COLUMNS, else the terminal's,
    else 80; at most 80, less 2, at least 50), without importing shutil: that costs 3-4 ms of ``--help`` (it
    imports bz2, lzma and fnmatch)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return max(min(columns if columns > 0 else 80, 80) - 2, 50)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "terminal_width": _help_width()})
@click.version_option(__version__, prog_name="diskport")
def main() -> None:
    """Convert, import and package virtual-machine disk images for KubeVirt-style platforms."""
    _pin_malloc_mmap_threshold()
    _one_blas_thread()


FORMAT_OPTION = click.option("-f", "--format", "source_format", type=click.Choice(format_names()),
                             help="Source format; detected from the content when omitted.")


def cache_options(func: Callable[P, R]) -> Callable[P, R]:
    """--cache and -v, the same for every command that writes a disk (convert, import, pull, build)."""
    func = click.option("-v", "--verbose", is_flag=True, help="Also say which page-cache mode was used and why.")(func)
    func = click.option("--cache", type=click.Choice(["auto", "writeback", "none"]), default="auto",
                        show_default=True, help="Page cache for the output: writeback (through it, bounded), none "
                        "(O_DIRECT), or auto: writeback when the output is under half of both the cgroup memory "
                        "limit and MemAvailable and the target is a file, else none.")(func)
    return func


def _say_cache(policy: Any, verbose: bool, job: JobProgress | None = None, prefix: str = "") -> None:
    """The -v line (after ``prefix``: which file, when a job writes several); ``job``'s last JSON line
    (--progress json) carries ``cache: {mode, reason}``."""
    if policy is None:
        return
    if job is not None:
        job.cache = policy.to_json()
    if verbose:
        click.echo(prefix + policy.line(), err=True)


def registry_options(func: Callable[P, R]) -> Callable[P, R]:
    """--ca-bundle, --tls-verify, --creds and --pull-secret: every command that talks to a registry (build --push,
    push, pull, and import, manifest and inspect --guest of docker://REF), with the same help everywhere.
    --pull-secret reaches :func:`_registry` through the click context, so no command's signature carries it."""

    command = func

    @wraps(command)
    def with_pull_secret(*args: P.args, **kwargs: P.kwargs) -> R:
        secret = kwargs.pop("pull_secret", None)
        context = click.get_current_context(silent=True)
        if context is not None and secret is not None:  # pull invokes import, which gets the default None
            context.meta[PULL_SECRET] = secret
        return command(*args, **kwargs)

    func = click.option("--pull-secret", type=click.Path(dir_okay=False), metavar="FILE",
                        help="A Kubernetes pull secret: the kubernetes.io/dockerconfigjson Secret (YAML or JSON, "
                             "as kubectl get secret -o yaml prints it) or its .dockerconfigjson; asked after "
                             "--creds, before the rest.")(with_pull_secret)
    func = click.option("--creds", metavar="USER:PASS",
                        help="Registry credentials [default: DISKPORT_USERNAME/DISKPORT_PASSWORD, then "
                             "~/.docker/config.json and credential helpers].")(func)
    func = click.option("--tls-verify", type=click.BOOL, default=True, show_default=True, metavar="BOOL",
                        help="Verify the registry's TLS certificate (--tls-verify=false to skip).")(func)
    return click.option("--ca-bundle", type=click.Path(dir_okay=False, exists=True),
                        help="CA certificates for https servers and registries.")(func)


def platform_option(func: Callable[P, R]) -> Callable[P, R]:
    """--platform: which image of an index a docker://REF gives."""
    return click.option("--platform", metavar="OS/ARCH",
                        help="docker://REF: which image of an index [default: this machine's].")(func)


def remote_options(func: Callable[P, R]) -> Callable[P, R]:
    """The registry options, --insecure and --platform: the commands whose SOURCE may be an http(s) URL or
    docker://REF (import, manifest, inspect)."""
    func = registry_options(func)
    func = platform_option(func)
    return click.option("--insecure", is_flag=True,
                        help="Do not verify TLS certificates (https servers and registries).")(func)


def push_options(func: Callable[P, R]) -> Callable[P, R]:
    """The options of every command that pushes: the registry options and --chunk-size."""
    func = click.option("--chunk-size", metavar="SIZE", help="PATCH size when an upload falls back to chunks "
                        "(K/M/G; the registry's minimum is honoured) [default: 64M].")(func)
    return registry_options(func)


def _registry(creds: str | None, tls_verify: bool, ca_bundle: str | None, reference: str,
              chunk_size: str | None = None) -> tuple[Any, Any]:
    from diskport.oci.auth import resolve_credentials
    from diskport.oci.reference import parse_reference
    from diskport.oci.registry import RegistryOptions

    ref = parse_reference(reference)
    options = RegistryOptions(tls_verify=tls_verify, ca_bundle=ca_bundle)
    if chunk_size is not None:
        options.chunk_size = parse_size(chunk_size)
        if options.chunk_size < 1024 * 1024:
            raise UsageError(f"--chunk-size {chunk_size} is below 1M")
    context = click.get_current_context(silent=True)
    pull_secret = context.meta.get(PULL_SECRET) if context is not None else None
    return options, resolve_credentials(ref, creds=creds, pull_secret=pull_secret)


def ova_options(func: Callable[P, R]) -> Callable[P, R]:
    """--vm, --all-disks and --disk N=DEST: which disks of an OVA appliance to write, and where."""
    func = click.option("--disk", "disk_targets", multiple=True, metavar="N=DEST",
                        help="OVA: write disk N (0 is the boot disk, as inspect lists them) to DEST "
                             "(repeatable); DESTINATION is then omitted.")(func)
    func = click.option("--all-disks", is_flag=True,
                        help="OVA: write every disk of the VM into the folder DESTINATION.")(func)
    return click.option("--vm", metavar="NAME", help="OVA with several virtual machines: which one.")(func)


def _ova_targets(destination: str | None, all_disks: bool, disk_targets: tuple[str, ...]) -> dict[int, str] | None:
    """None for a single destination (the boot disk), else the disks asked for (``{-1: folder}`` for all)."""
    if all_disks and disk_targets:
        raise UsageError("give --all-disks FOLDER or --disk N=DEST options, not both")
    if disk_targets:
        from diskport.ova.export import parse_targets  # the OVA writer: only when disks are named

        if destination:
            raise UsageError("with --disk N=DEST options, give no DESTINATION")
        return parse_targets(disk_targets)
    if not destination:
        raise UsageError("missing DESTINATION" + (" (the folder for --all-disks)" if all_disks else ""))
    return {-1: destination} if all_disks else None


def _write_ova(source: Any, targets: dict[int, str], vm: str | None, output_format: str, job: JobProgress,
               **options: Any) -> None:
    from diskport.ova.export import default_names, write_disks
    from diskport.sources.base import Source

    assert isinstance(source, Source)
    chosen: Any = targets
    if -1 in targets:
        folder = targets[-1]
        os.makedirs(folder, exist_ok=True)
        chosen = lambda pkg: default_names(pkg, vm, folder, output_format)  # noqa: E731 - names from the OVF
    pkg, results, seconds = write_disks(source, chosen, vm=vm, output_format=output_format, progress=job,
                                        **options)
    for r in results:
        click.echo(f"{pkg.name}: disk {r.index} ({r.disk_id}, {r.source_format}, {human_size(r.virtual_size)}"
                   f"{', ' + r.bus if r.bus else ''}{', boot' if r.index == 0 else ''}) -> {r.destination}: "
                   f"{human_size(r.data_bytes)} data", err=True)
    click.echo(f"{pkg.name}: {pkg.summary()}; {len(results)} disk(s) in {seconds:.2f} s", err=True)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("destination", type=click.Path(dir_okay=True), required=False)
@FORMAT_OPTION
@ova_options
@click.option("-O", "--output-format", type=click.Choice(OUTPUT_FORMATS), default="raw", show_default=True,
              help="Format to write.")
@click.option("-c", "compress", is_flag=True, help="Compress qcow2 clusters (deflate, as qemu-img -c).")
@click.option("--compression", type=click.Choice(["zlib", "zstd"]),
              help="Compress qcow2 clusters with this method (implies -c).")
@click.option("--cluster-size", type=int, default=65536, show_default=True, help="qcow2 cluster size.")
@click.option("--force", is_flag=True, help="Replace DESTINATION if it exists.")
@click.option("--sync", is_flag=True, help="Flush DESTINATION to stable storage before finishing.")
@click.option("--scratch", type=click.Path(file_okay=False, exists=True),
              help="Folder for scratch space when a compressed image needs random access "
                   "[default: DESTINATION's folder].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@cache_options
@handle_errors
def convert(source: str, destination: str | None, source_format: str | None, output_format: str, compress: bool,
            compression: str | None, cluster_size: int, force: bool, sync: bool, scratch: str | None,
            quiet: bool, vm: str | None = None, all_disks: bool = False, disk_targets: tuple[str, ...] = (),
            cache: str = "auto", verbose: bool = False) -> None:
    """Convert SOURCE (any supported format, or an OVA) into DESTINATION (raw or qcow2).

    DESTINATION is written beside itself and renamed when complete: a failed or interrupted conversion
    leaves nothing behind. An OVA gives its boot disk, or the disks --all-disks and --disk N=DEST ask for.
    """
    from diskport.engine import convert as convert_image
    from diskport.ova import OvaChoice
    from diskport.progress import JobProgress

    method = compression or ("zlib" if compress else None)
    targets = _ova_targets(destination, all_disks, disk_targets)
    if targets is not None:
        from diskport.sources import open_source

        with JobProgress(f"converting {click.format_filename(source)}", bar=not quiet) as job:
            _write_ova(open_source(source), targets, vm, output_format, job, scratch_dir=scratch, force=force,
                       sync=sync, cache=cache)
        return
    assert destination is not None
    with JobProgress(f"converting {click.format_filename(source)}", bar=not quiet) as job:
        result = convert_image(source, destination, output_format=output_format, source_format=source_format,
                               compression=method, cluster_size=cluster_size, force=force, sync=sync,
                               scratch_dir=scratch, progress=job, ova=OvaChoice(vm=vm), cache=cache)
    _say_cache(result.cache, verbose)
    if not quiet:
        if result.compression or not result.access.plain():
            click.echo(f"{result.source}: {result.access}", err=True)
        click.echo(f"{result.source} ({result.source_format}, {human_size(result.virtual_size)}) -> "
                   f"{result.destination} ({result.output_format}): {human_size(result.data_bytes)} data, "
                   f"{human_size(result.zero_bytes)} zeros, {result.seconds:.2f} s", err=True)


def manifest_options(func: Callable[P, R]) -> Callable[P, R]:
    """--target and the overrides, the same for manifest, build --manifest and import --manifest."""
    for option in reversed([
        click.option("--target", type=click.Choice(MANIFEST_TARGETS), default=DEFAULT_TARGET, show_default=True,
                     help="cpln: the platform's workload; kubevirt: a KubeVirt VirtualMachine."),
        click.option("--name", help="Name of the workload/VM [default: from SOURCE]."),
        click.option("--bus", type=click.Choice(["virtio", "sata", "scsi"]), help="Disk bus [default: from the "
                     "guest's drivers]."),
        click.option("--firmware", type=click.Choice(["bios", "efi"]), help="Firmware [default: from the disk's "
                     "boot loaders]."),
        click.option("--secure-boot/--no-secure-boot", "secure_boot", default=None,
                     help="UEFI Secure Boot [default: on when the UEFI loader is signed by a CA in the "
                          "firmware's db]."),
        click.option("--volume-set", metavar="NAME", help="cpln: the volume set of the boot disk's persistent "
                     "volume (needed for an http source)."),
        click.option("--cpu", type=click.IntRange(1, 256), metavar="N", help="CPUs [default: by guest kind]."),
        click.option("--memory", metavar="SIZE", help="Memory, as Kubernetes writes it (4Gi) [default: by guest "
                     "kind]."),
    ]):
        func = option(func)
    return func


def _overrides(name: str | None, size: str | None, bus: str | None, firmware: str | None,
               secure_boot: bool | None, volume_set: str | None, cpu: int | None, memory: str | None) -> Any:
    import re

    from diskport.manifest import Overrides

    if memory is not None and not re.fullmatch(r"[1-9][0-9]*(Mi|Gi|Ti|M|G|T)", memory):
        raise UsageError(f"--memory takes a Kubernetes quantity such as 4Gi or 2048Mi, not '{memory}'")
    return Overrides(name=name, size=parse_size(size) if size else None, bus=bus, firmware=firmware,
                     secure_boot=secure_boot, volume_set=volume_set, cpu=cpu, memory=memory)


def _emit_manifest(text: str, output: str | None) -> None:
    from diskport.manifest import write_atomic

    if output is None or output == "-":
        click.echo(text, nl=False)
    else:
        write_atomic(output, text)
        click.echo(f"wrote {output}", err=True)


@main.command("import")
@click.argument("source")
@click.argument("destination", type=click.Path(dir_okay=True), required=False)
@ova_options
@click.option("--size", "size_text", metavar="SIZE",
              help="Size of the persistent disk: bytes, or K/M/G/T (powers of 1024) or Ki/Mi/Gi/Ti. A larger "
                   "disk fails before anything is written; a raw disk is grown to SIZE.")
@click.option("-O", "--output-format", type=click.Choice(OUTPUT_FORMATS), default="raw", show_default=True)
@click.option("--checksum", metavar="ALGO:HEX", help="Verify the download (md5, sha1, sha256, sha512).")
@remote_options
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="Extra request header (repeatable); never sent to another host after a redirect.")
@click.option("--connections", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Ranged requests in flight at once (8 MiB each) when the server answers ranges.")
@click.option("--scratch", type=click.Path(file_okay=False, exists=True),
              help="Folder for scratch space, used only when needed [default: DESTINATION's folder].")
@click.option("--force", is_flag=True, help="Replace DESTINATION if it exists.")
@click.option("--progress", "progress_mode", type=click.Choice(["bar", "json", "none"]), default="bar",
              show_default=True, help="bar (on a terminal), JSON lines on stderr, or nothing.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve progress as Prometheus metrics on PORT (/metrics) while the import runs.")
@click.option("--inspect", "inspect_guest", is_flag=True,
              help="Look inside the disk written and print the guest's one-line verdict (OS, firmware, bus).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the manifest that boots SOURCE (an http(s) URL or docker://REF) from the disk "
                   "written; the manifest options below apply.")
@manifest_options
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary.")
@cache_options
@handle_errors
def import_(source: str, destination: str, size_text: str | None = None, output_format: str = "raw",
            checksum: str | None = None, ca_bundle: str | None = None, insecure: bool = False,
            headers: tuple[str, ...] = (), connections: int = 4, scratch: str | None = None, force: bool = False,
            progress_mode: str = "bar", metrics_port: int | None = None, platform: str | None = None,
            tls_verify: bool = True, creds: str | None = None, inspect_guest: bool = False,
            manifest_path: str | None = None, target: str = "cpln", name: str | None = None,
            bus: str | None = None, firmware: str | None = None, secure_boot: bool | None = None,
            volume_set: str | None = None, cpu: int | None = None, memory: str | None = None,
            quiet: bool = False, vm: str | None = None, all_disks: bool = False,
            disk_targets: tuple[str, ...] = (), cache: str = "auto", verbose: bool = False) -> None:
    """Import the disk at SOURCE (an http(s) URL, a file:// URL, a path, or docker://REF for a containerDisk
    image) into DESTINATION (file or block device), decompressed and converted (raw by default).

    Random-access formats are read straight over ranged requests when the server answers them; scratch space
    is used only for a random-access format inside a compressed file, on a server without ranges, or with
    --checksum, and the summary says which path was taken and why.
    """
    from diskport.importer import import_image
    from diskport.ova import OvaChoice
    from diskport.progress import JobProgress
    from diskport.sources.http import HttpOptions

    extra: dict[str, str] = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header takes 'Name: value', not '{header}'")
        extra[name.strip()] = value.strip()
    http = HttpOptions(headers=extra, ca_bundle=ca_bundle, insecure=insecure, streams=connections)
    size = parse_size(size_text) if size_text else None
    registry: Any = None
    credentials: Any = "auto"
    if source.startswith("docker://"):
        registry, credentials = _registry(creds, tls_verify and not insecure, ca_bundle, source)
    targets = _ova_targets(destination, all_disks, disk_targets)
    if targets is not None:
        from diskport.sources import open_source
        from diskport.sources.checksum import ChecksumSource, parse_checksum

        if source.startswith("docker://"):
            raise UsageError("--all-disks and --disk N=DEST are for OVA appliances, not containerDisk images")
        with JobProgress("converted", bar=progress_mode == "bar" and not quiet,
                         json_lines=progress_mode == "json" and not quiet, metrics_port=metrics_port) as job:
            opened: Any = open_source(source, http, job.on_download)
            extra_checks: tuple[Any, ...] = ()
            if checksum:
                opened = ChecksumSource(opened, *parse_checksum(checksum))
                extra_checks = (opened.verify,)
            _write_ova(opened, targets, vm, output_format, job, scratch_dir=scratch, force=force, sync=True,
                       size_limit=size, checks=extra_checks, cache=cache)
        return
    assert destination is not None
    boot = None
    if manifest_path is not None:
        overrides = _overrides(name, size_text, bus, firmware, secure_boot, volume_set, cpu, memory)
        boot = _import_boot_source(source, checksum, platform, registry, credentials)
        if boot.image is not None:
            source = f"docker://{boot.image}"  # import what the manifest pins
    with JobProgress("converted", bar=progress_mode == "bar" and not quiet,
                     json_lines=progress_mode == "json" and not quiet, metrics_port=metrics_port,
                     download_total=0 if "://" in source else None) as job:
        result = import_image(source, destination, size=size, output_format=output_format, checksum=checksum,
                              http=http, scratch_dir=scratch, force=force, job=job, platform=platform,
                              registry=registry, credentials=credentials,
                              inspect=inspect_guest or manifest_path is not None, ova=OvaChoice(vm=vm),
                              cache=cache)
        _say_cache(result.cache, verbose, job)
    if manifest_path is not None and boot is not None:
        _import_manifest(result, boot, target, overrides, manifest_path)
    if inspect_guest:
        # The verdict is what was asked for: it shows even with -q, on stdout.
        if result.guest is not None:
            click.echo(f"{result.destination}: guest: {result.guest.verdict_line()}")
        else:
            click.echo(f"diskport: warning: {result.destination}: the guest could not be inspected: "
                       f"{result.guest_error}", err=True)
    if not quiet:
        click.echo(f"{result.source}: {result.access}", err=True)
        layers = "".join(f", {layer}" for layer in result.compression)
        click.echo(f"{result.source} ({result.source_format}{layers}, {human_size(result.virtual_size)}) -> "
                   f"{result.destination} ({result.output_format}): "
                   f"{human_size(result.downloaded_bytes)} downloaded, {human_size(result.data_bytes)} data, "
                   f"{result.seconds:.2f} s" + (f", {result.checksum} verified" if result.checksum else ""),
                   err=True)


def _import_boot_source(source: str, checksum: str | None, platform: str | None, registry: Any,
                        credentials: Any) -> Any:
    """What the manifest of an import boots from, known before the import: a URL, or a reference pinned."""
    from diskport.manifest import BootSource, checked_checksum, docker_source

    if source.startswith("docker://"):
        return docker_source(source, platform, registry, credentials)[0]
    if source.startswith(("http://", "https://")):
        return BootSource("http", "", None, url=source, checksum=checked_checksum(checksum) if checksum else None,
                          checksum_why="set by --checksum, verified by the import" if checksum else "")
    raise UsageError(f"--manifest needs a SOURCE the platform can boot from (an http(s) URL or docker://REF), "
                     f"not the local '{source}': use `diskport manifest {source} --url URL` once it is published")


def _import_manifest(result: Any, boot: Any, target: str, overrides: Any, path: str) -> None:
    from diskport.manifest import manifest_for_report

    if result.guest is None:
        raise DiskportError(f"--manifest: the guest could not be inspected: {result.guest_error}",
                            path=result.destination)
    if result.appliance_vm is not None:  # the URL is the OVA's, which the platform cannot download
        raise UsageError(f"--manifest: {result.source} is an OVA, which neither CDI nor the platform downloads; "
                         f"the disk was imported to {result.destination}, no manifest written",
                         hint="publish its disks (convert --all-disks) and run `diskport manifest SOURCE --url URL`")
    boot.disk_format = boot.disk_format or result.source_format
    boot.virtual_size = result.virtual_size
    made = manifest_for_report(result.guest, boot, target, overrides, source_text=result.source,
                               inspected=f"{result.destination}, imported from {result.source}")
    for warning in made.plan.warnings:
        click.echo(f"diskport: warning: {safe_text(warning)}", err=True)
    _emit_manifest(made.text, path)


def _parse_disks(disk: str | None, disks: tuple[str, ...], arch: str | None) -> dict[str, str] | str:
    if disk and disks:
        raise UsageError("give DISK or --disk ARCH=PATH options, not both")
    if disk:
        return {arch: disk} if arch else disk
    if not disks:
        raise UsageError("no disk: give DISK, or --disk ARCH=PATH for each architecture")
    out: dict[str, str] = {}
    for item in disks:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--disk takes ARCH=PATH (amd64=disk.qcow2), not '{item}'")
        out[name] = path
    return out


@main.command()
@click.argument("disk", required=False, type=click.Path(dir_okay=False))
@click.option("-t", "--tag", "reference", metavar="REF",
              help="Name of the image: a tag in the layout or archive, registry/name:tag for --push.")
@click.option("--output", type=click.Path(file_okay=False), help="OCI image layout folder [default: ./NAME.oci].")
@click.option("--docker-archive", type=click.Path(dir_okay=False), help="Write a docker-archive tarball instead.")
@click.option("--push", "push_it", is_flag=True, help="Push the image to REF (-t) after building it.")
@click.option("--arch", help="Architecture of DISK [default: this machine's].")
@click.option("--disk", "disks", multiple=True, metavar="ARCH=PATH",
              help="One disk per architecture (repeatable): builds an image index.")
@click.option("--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip", show_default=True,
              help="Layer compression.")
@click.option("--convert", "convert_to", type=click.Choice(["qcow2"]),
              help="Convert the disk to qcow2 first (for formats a containerDisk cannot boot as they are).")
@click.option("-c", "compress", is_flag=True, help="With --convert: compress the qcow2 clusters.")
@click.option("--source", "source_url", metavar="URL", help="org.opencontainers.image.source annotation.")
@click.option("--instancetype", metavar="NAME",
              help="KubeVirt default-instancetype hint (u1.medium...) in the image; CDI makes it a PVC label.")
@click.option("--scratch", type=click.Path(file_okay=False, exists=True),
              help="Folder for a converted disk [default: beside the output] and, for --push without --output, "
                   "the image until it is sent [default: $TMPDIR].")
@click.option("--force", is_flag=True, help="Replace the output if it exists.")
@push_options
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --push: also write the manifest that boots the pushed image, pinned by digest, from "
                   "the inspection the build does; the manifest options below apply.")
@manifest_options
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary.")
@cache_options
@handle_errors
def build(disk: str | None, reference: str | None, output: str | None, docker_archive: str | None, push_it: bool,
          arch: str | None, disks: tuple[str, ...], compression: str, convert_to: str | None, compress: bool,
          source_url: str | None, scratch: str | None, force: bool, ca_bundle: str | None, tls_verify: bool,
          creds: str | None, chunk_size: str | None, quiet: bool, manifest_path: str | None = None,
          target: str = "cpln", name: str | None = None, bus: str | None = None, firmware: str | None = None,
          secure_boot: bool | None = None, volume_set: str | None = None, cpu: int | None = None,
          memory: str | None = None, instancetype: str | None = None, cache: str = "auto",
          verbose: bool = False) -> None:
    """Package DISK as a containerDisk image: FROM scratch, the disk under /disk/ owned by 107:107 (qemu).

    Writes an OCI image layout (default ./NAME.oci), a docker-archive (--docker-archive), or pushes (--push -t
    REF). The same disk gives the same digests every time (times are SOURCE_DATE_EPOCH, else 0).
    """
    import tempfile

    from diskport.oci.build import build_image
    from diskport.oci.push import push_layout
    from diskport.progress import JobProgress

    if push_it and not reference:
        raise UsageError("--push needs -t registry/name:tag")
    if compress and not convert_to:
        raise UsageError("-c compresses the converted qcow2: use it with --convert qcow2")
    if push_it and docker_archive:
        raise UsageError("--push sends the image to a registry; --docker-archive writes a file: choose one")
    if manifest_path is not None and not push_it:
        raise UsageError("--manifest pins the pushed image by its digest: use it with --push -t REF")
    overrides = _overrides(name, None, bus, firmware, secure_boot, volume_set, cpu, memory)
    chosen = _parse_disks(disk, disks, arch)
    registry = _registry(creds, tls_verify, ca_bundle, reference, chunk_size) if push_it and reference else None
    # A layout names its image by tag (ref.name), an archive by reference (RepoTags); a push names it by REF.
    tag = reference
    if reference:
        from diskport.oci.reference import check_image_name, layout_tag

        tag = check_image_name(reference) if docker_archive else layout_tag(reference)
    if push_it:
        tag = None
    with contextlib.ExitStack() as stack, JobProgress("packaging", bar=not quiet) as job:
        layout = output
        if push_it and output is None:
            layout = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(dir=scratch, prefix=".diskport-")),
                                  "image.oci")
        result = build_image(chosen, output=layout, docker_archive=docker_archive, tag=tag,
                             compression=compression, convert_to=convert_to,
                             convert_compression="zlib" if compress else None, source=source_url, force=force,
                             scratch_dir=scratch, progress=job, phase=job.set_phase,
                             warn=lambda text: click.echo(f"diskport: warning: {safe_text(text)}", err=True),
                             instancetype=instancetype, cache=cache)
        pushed = None
        if push_it and registry is not None and result.output and reference:
            job.set_phase("pushing")
            pushed = push_layout(result.output, reference, options=registry[0], credentials=registry[1],
                                 progress=job)
    if manifest_path is not None and pushed is not None and reference:
        _build_manifest(result, pushed, reference, target, overrides, manifest_path)
    for key, image in result.images.items():
        for what, policy in image.cache.items():
            _say_cache(policy, verbose, prefix=f"{key} {what}: ")
    if quiet:
        return
    for key, image in result.images.items():
        layer = (f", layer {image.layer.descriptor.digest} ({human_size(image.layer.descriptor.size)})"
                 if image.layer else "")
        click.echo(f"{key}: disk/{image.disk_name} ({image.disk_format}, {human_size(image.disk_size)}){layer}",
                   err=True)
        if image.guest is not None:
            click.echo(f"{key}: guest: {image.guest.verdict_line()}", err=True)
    if result.docker_archive:
        archived = next(iter(result.images.values())).archive
        click.echo(f"wrote {result.docker_archive}" + (f" (image {archived.config_digest})" if archived else ""),
                   err=True)
    if pushed is not None:
        click.echo(f"pushed {pushed.reference}@{pushed.digest}: {human_size(pushed.sent_bytes)} sent, "
                   f"{human_size(pushed.skipped_bytes)} already there, {result.seconds + pushed.seconds:.2f} s",
                   err=True)
    elif result.output:
        digest = result.descriptor.digest if result.descriptor else ""
        click.echo(f"wrote {result.output} ({digest}) in {result.seconds:.2f} s", err=True)


def _build_manifest(result: Any, pushed: Any, reference: str, target: str, overrides: Any, path: str) -> None:
    from diskport.manifest import BootSource, manifest_for_report
    from diskport.oci.platform import host_architecture
    from diskport.oci.reference import parse_reference

    images = result.images
    image = images.get(host_architecture()) or next(iter(images.values()))
    if image.guest is None:
        raise DiskportError("--manifest: the guest was not inspected, so there is nothing to choose the fields "
                            "from", path=image.source)
    pinned = f"{parse_reference(reference.removeprefix('docker://')).name}@{pushed.digest}"
    boot = BootSource("docker", image.disk_format, image.guest.virtual_size, image=pinned, pinned_from=reference)
    inspected = image.source + (f", converted to {image.disk_format}" if image.converted else "")
    made = manifest_for_report(image.guest, boot, target, overrides, source_text=f"docker://{reference}",
                               inspected=inspected)
    for warning in made.plan.warnings:
        click.echo(f"diskport: warning: {safe_text(warning)}", err=True)
    _emit_manifest(made.text, path)


@main.command()
@click.argument("layout", type=click.Path(file_okay=False, exists=True))
@click.argument("reference", metavar="REF")
@push_options
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary.")
@handle_errors
def push(layout: str, reference: str, ca_bundle: str | None, tls_verify: bool, creds: str | None,
         chunk_size: str | None, quiet: bool) -> None:
    """Push the image in the OCI layout LAYOUT to REF (registry/namespace/name:tag; docker:// optional).

    Blobs the registry already has are skipped; a broken upload resumes where the registry says it stopped.
    """
    from diskport.oci.push import push_layout
    from diskport.progress import JobProgress

    options, credentials = _registry(creds, tls_verify, ca_bundle, reference, chunk_size)
    with JobProgress("pushing", bar=not quiet) as job:
        result = push_layout(layout, reference, options=options, credentials=credentials, progress=job)
    if not quiet:
        click.echo(f"pushed {result.reference}@{result.digest}: {human_size(result.sent_bytes)} sent, "
                   f"{human_size(result.skipped_bytes)} already there, {result.seconds:.2f} s", err=True)


@main.command()
@click.argument("reference", metavar="REF")
@click.argument("destination", type=click.Path(dir_okay=False))
@platform_option
@click.option("-O", "--output-format", type=click.Choice(OUTPUT_FORMATS), default="raw", show_default=True)
@click.option("--size", "size_text", metavar="SIZE", help="As for import: the disk must fit; raw is grown to it.")
@registry_options
@click.option("--scratch", type=click.Path(file_okay=False, exists=True),
              help="Folder for scratch space, used only when needed [default: DESTINATION's folder].")
@click.option("--force", is_flag=True, help="Replace DESTINATION if it exists.")
@click.option("--progress", "progress_mode", type=click.Choice(["bar", "json", "none"]), default="bar",
              show_default=True, help="bar (on a terminal), JSON lines on stderr, or nothing.")
@click.option("--inspect", "inspect_guest", is_flag=True,
              help="Look inside the disk written and print the guest's one-line verdict (OS, firmware, bus).")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no summary.")
@cache_options
@click.pass_context
def pull(ctx: click.Context, /, reference: str, destination: str, **options: Any) -> None:
    """Pull the containerDisk image REF and convert its disk into DESTINATION (raw by default).

    The same as `diskport import docker://REF DESTINATION`.
    """
    ctx.invoke(import_, source=f"docker://{reference.removeprefix('docker://')}", destination=destination,
               **options)


@main.command()
@click.argument("source")
@manifest_options
@click.option("--size", "size_text", metavar="SIZE", help="kubevirt: the DataVolume's size [default: the virtual "
              "size rounded up to a whole Gi].")
@click.option("--checksum", metavar="ALGO:HEX", help="Checksum of the file at the URL (cpln: sha256 or sha512).")
@click.option("--compute-checksum", "compute", is_flag=True, help="Read the file once and write its sha256.")
@click.option("--url", metavar="URL", help="With a local image: the URL it will be published at. With an OVA: "
              "where its disks (convert --all-disks) are published, a folder URL ending in / or the boot disk's.")
@click.option("--vm", metavar="NAME", help="OVA with several virtual machines: which one.")
@FORMAT_OPTION
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the YAML to FILE (atomically) "
              "[default: stdout].")
@remote_options
@click.option("--scratch", type=click.Path(file_okay=False, exists=True),
              help="Folder to spool a compressed disk to when it must be inspected.")
@handle_errors
def manifest(source: str, target: str, name: str | None, bus: str | None, firmware: str | None,
             secure_boot: bool | None, volume_set: str | None, cpu: int | None, memory: str | None,
             size_text: str | None, checksum: str | None, compute: bool, url: str | None, vm: str | None,
             source_format: str | None, output: str | None, ca_bundle: str | None, insecure: bool,
             platform: str | None, tls_verify: bool, creds: str | None, scratch: str | None) -> None:
    """Write the manifest that boots SOURCE: docker://REF (a containerDisk, pinned by digest), an http(s) URL,
    or a local image with --url.

    What the guest needs (firmware, secure boot, bus, network, guest OS) is read from inside the image, or
    from the labels `diskport build` wrote into it; every option overrides it, and the YAML's comments say
    where each value came from. An OVA adds its OVF's firmware (when the disk cannot tell), CPU, memory and
    data disks; --url then says where its disks (convert --all-disks) are published.
    """
    from diskport.manifest import generate
    from diskport.sources.http import HttpOptions

    overrides = _overrides(name, size_text, bus, firmware, secure_boot, volume_set, cpu, memory)
    registry: Any = None
    credentials: Any = "auto"
    if source.startswith("docker://"):
        registry, credentials = _registry(creds, tls_verify and not insecure, ca_bundle, source)
    http = HttpOptions(ca_bundle=ca_bundle, insecure=insecure)
    result = generate(source, target=target, overrides=overrides, fmt=source_format, url=url, checksum=checksum,
                      compute=compute, http=http, platform=platform, registry=registry, credentials=credentials,
                      scratch_dir=scratch, vm=vm)
    for warning in result.plan.warnings:
        click.echo(f"diskport: warning: {safe_text(warning)}", err=True)
    _emit_manifest(result.text, output)


@main.command()
@click.argument("image")
@FORMAT_OPTION
@click.option("--vm", metavar="NAME", help="OVA with several virtual machines: which one.")
@click.option("--json", "as_json", is_flag=True, help="JSON with qemu-img info's field names.")
@click.option("--guest", is_flag=True, help="Look inside the guest: partitions, filesystems, firmware, OS, "
              "drivers, and the platform settings it needs.")
@remote_options
@click.option("--scratch", type=click.Path(file_okay=False, exists=True),
              help="Folder to spool a compressed disk to [default: the system's temporary folder].")
@click.option("--size-scan-limit", "scan_limit", metavar="SIZE", default="8G", show_default=True,
              help="How much of a raw disk in a compressed file to decompress to learn its size.")
@handle_errors
def inspect(image: str, source_format: str | None, as_json: bool, guest: bool, ca_bundle: str | None = None,
            insecure: bool = False, platform: str | None = None, tls_verify: bool = True, creds: str | None = None,
            scratch: str | None = None, scan_limit: str = "8G", vm: str | None = None) -> None:
    """Show an image's format, sizes and format-specific facts; with --guest, what is inside it.

    IMAGE is a path or an http(s) URL (read with range requests); with --guest also docker://REF (the disk of
    a containerDisk image).
    """
    from diskport.ova import OvaChoice

    if guest:
        from diskport.guest import inspect_guest
        from diskport.guest.render import render_guest
        from diskport.inspect import render_ova
        from diskport.sources.http import HttpOptions

        registry: Any = None
        credentials: Any = "auto"
        if image.startswith("docker://"):
            registry, credentials = _registry(creds, tls_verify and not insecure, ca_bundle, image)
        http = HttpOptions(ca_bundle=ca_bundle, insecure=insecure)
        appliance: dict[str, Any] | None = None
        if image.startswith("docker://"):
            report = inspect_guest(image, source_format, scratch_dir=scratch, http=http, platform=platform,
                                   registry=registry, credentials=credentials)
        else:
            # Opened here, as inspect_guest would, so that an OVA's descriptor facts join the guest's.
            from diskport.formats import open_image
            from diskport.sources import open_source

            location: Any = open_source(image, http) if "://" in image else image
            with open_image(location, source_format, scratch_dir=scratch, random_access=True,
                            ova=OvaChoice(vm=vm)) as opened:
                report = inspect_guest(opened)
                if opened.appliance is not None:
                    appliance = opened.appliance.facts(vm)
            report.filename = image
        if as_json:
            import json

            data = report.to_json()
            if appliance is not None:
                data["ova"] = appliance
            click.echo(json.dumps(data, indent=2))
        else:
            click.echo(render_guest(report) + ("\n" + "\n".join(render_ova(appliance)) if appliance else ""))
        return
    from diskport.inspect import inspect_image, render_text

    with contextlib.ExitStack() as stack:
        target: Any = image
        if image.startswith(("http://", "https://")):
            from diskport.sources import open_source
            from diskport.sources.http import HttpOptions

            target = stack.enter_context(open_source(image, HttpOptions(ca_bundle=ca_bundle, insecure=insecure)))
        facts: dict[str, Any] = inspect_image(target, source_format, scratch_dir=scratch,
                                              size_scan_limit=parse_size(scan_limit), ova=OvaChoice(vm=vm))
    if as_json:
        import json  # only --json needs it

        click.echo(json.dumps(facts, indent=2))
    else:
        click.echo(render_text(facts))


if __name__ == "__main__":
    main()
