"""The DEV pipeline commands: ``plan``, ``build``, ``package``, ``release``, ``verify``, ``keys``.

Each command parses its options, calls one library function and prints the result; library errors
(SyncToolsError) become one line on stderr and exit 1 through the group.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from sync_tools.cli._common import config_option, echo_json, json_option, load, split_names
from sync_tools.config import Config
from sync_tools.errors import ConfigError, DataError


def _only_option(f):  # type: ignore[no-untyped-def]
    return click.option("--only", "only", multiple=True, required=True, metavar="NAME[,NAME]",
                        help="The subsystem(s) to act on (comma list or repeated).")(f)


def _platform_option(f):  # type: ignore[no-untyped-def]
    return click.option("--platform", "platform", metavar="OS/ARCH",
                        help="Target platform (default: this machine), e.g. linux/arm64.")(f)


# -------------------------------------------------------------------------------------------- plan


@click.command("plan")
@click.option("--event", "event_path", type=click.Path(dir_okay=False),
              help="A repository_dispatch / workflow_dispatch event file ($GITHUB_EVENT_PATH).")
@click.option("--changed-files", "changed_path", metavar="FILE|-",
              help="Changed repository paths, one per line or a JSON list ('-' reads stdin).")
@click.option("--base", "base", metavar="REF", help="Plan from the files changed between REF and --head.")
@click.option("--head", "head", default="HEAD", show_default=True, metavar="REF", help="With --base.")
@click.option("--from-check", "from_check", is_flag=True, help="Plan the subsystems whose upstream has an update.")
@click.option("--all", "plan_all", is_flag=True, help="Plan every subsystem.")
@click.option("--platform", "platforms", multiple=True, metavar="OS/ARCH[,OS/ARCH]",
              help="Only these platforms (default: the config's platforms).")
@click.option("--github-output", "github_output", type=click.Path(dir_okay=False), envvar="GITHUB_OUTPUT",
              help="Append matrix=, has_work= and changed= lines here (default: $GITHUB_OUTPUT).")
@json_option
@config_option
def plan(event_path: str | None, changed_path: str | None, base: str | None, head: str, from_check: bool,
         plan_all: bool, platforms: tuple[str, ...], github_output: str | None, as_json: bool,
         config_path: str | None) -> None:
    """The GitHub Actions matrix of what to build, as JSON: {"include": [{subsystem, platform, os, arch,
    runner}]}; an empty plan is {"include": []}.

    Give exactly one source. Changed files pull in the subsystems that depend on a changed one; an
    all-zeros or unknown --base (new branch, shallow clone) plans everything.

    \b
    Example:
      sync-tools plan --event "$GITHUB_EVENT_PATH"            # repository_dispatch / workflow_dispatch
      sync-tools plan --base "${{ github.event.before }}"     # push: only what changed
      git diff --name-only HEAD~1 | sync-tools plan --changed-files -
      sync-tools plan --from-check --platform linux/amd64
    """
    from sync_tools import plan as planning

    sources = [s for s in (event_path, changed_path, base, from_check or None, plan_all or None) if s]
    if len(sources) != 1:
        raise click.UsageError("give exactly one of --event, --changed-files, --base, --from-check, --all")
    config = load(config_path)
    versions: dict[str, str] = {}
    if event_path:
        event = planning.load_event(Path(event_path))
        names = planning.names_from_event(config, event)
        versions = planning.versions_from_event(event)
        reason = f"event {event_path}"
    elif changed_path:
        try:
            text = sys.stdin.read() if changed_path == "-" else Path(changed_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{changed_path}: cannot read the changed-files list: {e}") from e
        names = planning.names_from_files(config, planning.read_changed_files(text))
        reason = "changed files"
    elif base:
        read = {f for s in config.subsystems.values() if (f := planning.pin_file(config, s))}
        if (config_rel := planning.config_file(config)) is not None:
            read.add(config_rel)
        diff = planning.diff_from_base(config.root, base, head, read=read)
        if diff is None:
            names, reason = list(config.subsystems), f"base {base} unknown: everything"
        else:
            files, old = diff
            hit = (set(planning.names_from_files(config, files)) | set(planning.names_from_pins(config, files, old))
                   | set(planning.names_from_config(config, files, old)))
            names, reason = [n for n in config.subsystems if n in hit], f"files, pins or config changed since {base}"
    elif from_check:
        names, versions = planning.names_from_check(config)
        reason = "upstream updates"
    else:
        names, reason = list(config.subsystems), "all"
    result = planning.make_plan(config, names, split_names(platforms) or None, reason, versions)
    if github_output:
        try:
            with open(github_output, "a", encoding="utf-8") as fh:
                fh.write(result.github_output())
        except OSError as e:
            raise ConfigError(f"cannot append to the GitHub output file: {e.strerror or e}",
                              path=github_output) from e
    click.echo(f"plan ({reason}): {', '.join(result.subsystems) or 'nothing to do'}", err=True)
    for notice in result.notices:
        click.echo(f"notice: {notice}", err=True)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and result.notices:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write("### Left out of the plan\n\n" + "".join(f"- {n}\n" for n in result.notices) + "\n")
        except OSError as e:
            click.echo(f"warning: cannot append to $GITHUB_STEP_SUMMARY: {e.strerror or e}", err=True)
    echo_json(result.matrix())


# ------------------------------------------------------------------------------------------- build


@click.command("build")
@_only_option
@_platform_option
@click.option("--version", "version", metavar="VERSION",
              help="Build this upstream version instead of the pin, then update the pin where it lives.")
@click.option("--no-pin", "no_pin", is_flag=True, help="With --version: leave the pin unchanged.")
@click.option("--allow-major", "allow_major", is_flag=True,
              help="With --version: take a new major version of a `major: manual` subsystem.")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds each build command may take.")
@json_option
@config_option
def build(only: tuple[str, ...], platform: str | None, version: str | None, no_pin: bool, allow_major: bool,
          timeout: float, as_json: bool, config_path: str | None) -> None:
    """Run the subsystems' build commands (default: task NAME:src:update, task NAME:bin:build) in the
    workspace, with GOOS/GOARCH for --platform, and write NAME/.bin/.version.

    Several subsystems build in depends_on order; the first failing command stops the build. Nothing
    belonging to another subsystem is touched.

    \b
    Example:
      sync-tools build --only nats
      sync-tools build --only nats --version v2.10.25 --platform linux/arm64
      sync-tools build --only nats --version v3.0.0 --allow-major   # a new major, under major: manual
    """
    from sync_tools.build import build as run_build
    from sync_tools.build import stop_on_sigterm

    stop_on_sigterm()  # a relay or CI job that gives up on the build terminates it: clean up first
    config = load(config_path)
    # With --json, stdout carries only the JSON: the commands' output goes to stderr.
    results = run_build(config, split_names(only), platform=platform, version=version, update_pin=not no_pin,
                        allow_major=allow_major, timeout=timeout, output=2 if as_json else None)
    if as_json:
        echo_json([r.to_json() for r in results])
        return
    for r in results:
        pin = " (pin updated)" if r.pin_updated else ""
        click.echo(f"built {r.subsystem} {r.info.version or '?'} for {r.platform}: {r.binary} "
                   f"sha256 {r.info.checksum} in {r.seconds:.1f}s{pin}")


# ----------------------------------------------------------------------------------------- package


@click.command("package")
@_only_option
@_platform_option
@click.option("--dist", "dist", type=click.Path(file_okay=False), help="Output directory (default: .dist).")
@json_option
@config_option
def package(only: tuple[str, ...], platform: str | None, dist: str | None, as_json: bool,
            config_path: str | None) -> None:
    """Pack the built binary into .dist/<binary>-<os>-<arch>.tar.gz, reproducibly (sorted entries,
    mtime from SOURCE_DATE_EPOCH or the source commit, uid/gid 0, fixed gzip header), plus a .json
    sidecar saying what it holds.

    \b
    Example:
      sync-tools package --only nats --platform linux/amd64
      SOURCE_DATE_EPOCH=1700000000 sync-tools package --only nats --json
    """
    from sync_tools.package import package as run_package

    config = load(config_path)
    results = [run_package(config, n, platform=platform, dist=Path(dist) if dist else None)
               for n in split_names(only)]
    if as_json:
        echo_json([{**r.to_json(), "path": str(r.path)} for r in results])
        return
    for r in results:
        click.echo(f"{r.path}  {r.size} bytes  sha256 {r.sha256}  binary_sha256 {r.binary_sha256}")


# ----------------------------------------------------------------------------------------- release


@click.command("release")
@click.option("--only", "only", multiple=True, metavar="NAME[,NAME]",
              help="The subsystem(s) to release (comma list or repeated).")
@click.option("--refresh", is_flag=True,
              help="Instead: re-sign the manifest as it is, expiry renewed and serial + 1 (run it on a "
                   "schedule, so agents never see an expired manifest while upstreams are quiet).")
@click.option("--platform", "platforms", multiple=True, metavar="OS/ARCH[,OS/ARCH]",
              help="Only these platforms' packaged assets (default: all packaged for NAME).")
@click.option("--dist", "dist", type=click.Path(file_okay=False), help="Where the packaged assets are (.dist).")
@click.option("--artifacts", "artifacts", type=click.Path(file_okay=False),
              help="Instead of --dist: the build legs' artifacts, a folder each (dist-<subsystem>-<os>-<arch>, "
                   "as actions/download-artifact lays them out without merge-multiple); each must hold only "
                   "its own leg's package.")
@click.option("--allow-downgrade", "allow_downgrade", is_flag=True,
              help="Release NAME even when the manifest holds a newer version (a deliberate rollback).")
@json_option
@config_option
def release(only: tuple[str, ...], refresh: bool, platforms: tuple[str, ...], dist: str | None,
            artifacts: str | None, allow_downgrade: bool, as_json: bool, config_path: str | None) -> None:
    """Upload only NAME's packaged assets to the release store, then put NAME's entry into manifest.json
    (every other entry untouched, serial + 1, expiry renewed) and re-sign it with the key in
    $SYNC_TOOLS_SIGNING_KEY (a path or the PEM). Several names: one manifest write for all of them.

    The current manifest must verify with release.public_key first. A build older than the one the
    manifest holds is refused (a late or stale job must not roll agents back) unless
    --allow-downgrade; among several names it is skipped (said so) and the others are released, and
    the command fails only when every one is refused. A release racing another (a parallel job)
    re-reads and redoes its change.

    \b
    Example:
      SYNC_TOOLS_SIGNING_KEY=keys/release.key sync-tools release --only nats
      sync-tools release --only nats --platform linux/amd64 --json
      sync-tools release --refresh          # weekly: the manifest never expires under the agents
    """
    from sync_tools import release as releasing

    if refresh == bool(only) or (refresh and (platforms or dist or artifacts or allow_downgrade)):
        raise click.UsageError("give --only NAME (with --platform/--dist/--artifacts/--allow-downgrade if "
                               "wanted), or --refresh alone")
    if dist and artifacts:
        raise click.UsageError("give --dist or --artifacts, not both")
    config = load(config_path)
    if artifacts:
        import tempfile

        from sync_tools.package import take_leg_packages

        with tempfile.TemporaryDirectory(prefix="sync-tools-legs-") as taken:
            take_leg_packages(Path(artifacts), Path(taken))
            _release(config, only, platforms, Path(taken), allow_downgrade, as_json)
        return
    if refresh:
        m = releasing.refresh(config)
        if as_json:
            echo_json({"serial": m.serial, "expires": m.expires})
        else:
            click.echo(f"refreshed manifest.json: serial {m.serial}, expires {m.expires}")
        return
    _release(config, only, platforms, Path(dist) if dist else None, allow_downgrade, as_json)


def _release(config: Config, only: tuple[str, ...], platforms: tuple[str, ...], dist: Path | None,
             allow_downgrade: bool, as_json: bool) -> None:
    from sync_tools import release as releasing

    results = releasing.release_many(config, split_names(only), dist=dist,
                                     platforms=split_names(platforms) or None, allow_downgrade=allow_downgrade,
                                     patch_from=config.release.patches)
    if as_json:
        echo_json([r.to_json() for r in results])
        return
    for r in results:
        if r.skipped:
            click.echo(f"skipped {r.subsystem} {r.version} ({r.commit[:12]}): {r.skipped}")
            continue
        click.echo(f"released {r.subsystem} {r.version} ({r.commit[:12]}) to {r.store}: manifest serial "
                   f"{r.serial}; assets: {', '.join(a.name for a in r.assets)}")


# ------------------------------------------------------------------------------------------ verify


@click.command("verify")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("--root", "root", type=click.Path(file_okay=False),
              help="Install root holding NAME/.bin (default: the workspace).")
@json_option
@config_option
def verify(names: tuple[str, ...], root: str | None, as_json: bool, config_path: str | None) -> None:
    """Check each installed binary's sha256 against its .bin/.version; exit 1 naming every mismatch
    or missing binary.

    \b
    Example:
      sync-tools verify
      sync-tools verify nats --json
    """
    from sync_tools.build import verify_installed

    config = load(config_path)
    results = verify_installed(config, names, Path(root).resolve() if root else None)
    if as_json:
        echo_json({r.subsystem: r.to_json() for r in results})
    else:
        for r in results:
            click.echo(f"{r.status:<16} {r.subsystem:<16} {r.actual or r.detail}")
    bad = [r for r in results if not r.ok]
    if bad:
        click.echo("Error: verify failed: " + "; ".join(f"{r.subsystem}: {r.status}" for r in bad), err=True)
        raise SystemExit(1)


# -------------------------------------------------------------------------------------------- keys


@click.group("keys")
def keys() -> None:
    """Release signing keys (ed25519): agents pin the public key, CI signs with the private one."""


@keys.command("generate")
@click.option("--out", "out", type=click.Path(file_okay=False), default="keys", show_default=True,
              help="Directory for <name>.key (mode 0600) and <name>.pub.")
@click.option("--name", "name", default="release", show_default=True, help="File name stem.")
@json_option
def generate(out: str, name: str, as_json: bool) -> None:
    """Generate an ed25519 key pair; never overwrites an existing key.

    \b
    Example:
      sync-tools keys generate --out keys     # keys/release.key + keys/release.pub
      gh secret set SYNC_TOOLS_SIGNING_KEY < keys/release.key
    """
    from sync_tools.signing import write_keypair

    priv, pub = write_keypair(Path(os.path.expanduser(out)), name)
    if as_json:
        echo_json({"private_key": str(priv), "public_key": str(pub)})
        return
    click.echo(f"private key: {priv} (mode 0600; keep it secret, e.g. the SYNC_TOOLS_SIGNING_KEY secret)")
    click.echo(f"public key:  {pub} (set release.public_key to it; agents pin it)")
