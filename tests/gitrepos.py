"""Real git repositories on disk for tests, made with dulwich (no git binary needed).

Typical use::

    from tests.gitrepos import GitRepo

    repo = GitRepo.create(tmp_path / "nats.git")          # bare, HEAD -> refs/heads/main
    c1 = repo.commit("first", files={"main.go": b"package main\\n"})
    repo.tag("v1.0.0")                                    # lightweight, on the branch head
    c2 = repo.commit("second")
    repo.tag("v1.1.0", annotated=True, message="1.1")     # annotated: a tag object pointing at c2
    repo.branch("dev", c1)                                # another branch
    repo.set_head("dev")                                  # the remote HEAD now names dev
    repo.many_tags([f"v0.{i}.0" for i in range(1000)])    # fast bulk (packed-refs)

Every commit builds on the current head of its branch and carries the files given plus those it
inherits, so repos are real enough to clone and build from. Times are fixed so repos are reproducible.
"""

from __future__ import annotations

import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dulwich.file import GitFile
from dulwich.objects import Blob, Commit, Tag, Tree
from dulwich.refs import write_packed_refs
from dulwich.repo import Repo

_AUTHOR = b"Test Author <test@example.org>"
_EPOCH = 1_700_000_000  # fixed clock: the same calls give the same shas


@dataclass
class GitRepo:
    """A git repository on disk plus the helpers tests need. ``path`` is what a git URL points at."""

    path: Path
    repo: Repo
    default_branch: str = "main"
    _clock: int = _EPOCH

    @classmethod
    def create(cls, path: Path | str, *, bare: bool = True, branch: str = "main") -> GitRepo:
        """A new empty repository at *path* (created), HEAD pointing at ``refs/heads/<branch>``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        repo = Repo.init_bare(str(path)) if bare else Repo.init(str(path))
        repo.refs.set_symbolic_ref(b"HEAD", f"refs/heads/{branch}".encode())
        return cls(path=path, repo=repo, default_branch=branch)

    # ------------------------------------------------------------------ commits and refs

    def head(self, branch: str | None = None) -> str | None:
        """The commit sha at the head of *branch* (default branch when None), or None if unborn."""
        ref = f"refs/heads/{branch or self.default_branch}".encode()
        try:
            return self.repo.refs[ref].decode()
        except KeyError:
            return None

    def commit(self, message: str = "change", files: Mapping[str, bytes] | None = None,
               branch: str | None = None) -> str:
        """Add a commit on *branch* (created if new) with *files* changed; returns its sha."""
        branch = branch or self.default_branch
        ref = f"refs/heads/{branch}".encode()
        parent = self.repo.refs[ref] if ref in self.repo.refs else None
        contents: dict[str, bytes] = dict(self._files(parent)) if parent else {}
        if files is None:
            # always change something so each commit has a distinct tree
            contents["CHANGES"] = contents.get("CHANGES", b"") + f"{message}\n".encode()
        else:
            contents.update(files)
        c = self._new_commit(contents, parent, message)
        self.repo.refs[ref] = c.id
        return c.id.decode()

    def _new_commit(self, contents: Mapping[str, bytes], parent: bytes | None, message: str) -> Commit:
        """A commit of *contents* on *parent*, stored (no ref moved), one fixed-clock minute later."""
        c = Commit()
        c.tree = self._write_tree(contents)
        c.parents = [parent] if parent else []
        c.author = c.committer = _AUTHOR
        self._clock += 60
        c.author_time = c.commit_time = self._clock
        c.author_timezone = c.commit_timezone = 0
        c.encoding = b"UTF-8"
        c.message = message.encode() + b"\n"
        self.repo.object_store.add_object(c)
        return c

    def commit_chain(self, changes: Iterable[tuple[str, Mapping[str, bytes]]],
                     branch: str | None = None) -> list[str]:
        """Many commits in a row on *branch* (default branch), each (message, files changed), like
        repeated :meth:`commit` calls but moving the branch ref once at the end: hundreds of commits
        cost one ref write instead of one locked, fsynced write each. Returns the shas in order."""
        branch = branch or self.default_branch
        ref = f"refs/heads/{branch}".encode()
        parent = self.repo.refs[ref] if ref in self.repo.refs else None
        contents: dict[str, bytes] = dict(self._files(parent)) if parent else {}
        shas: list[str] = []
        for message, files in changes:
            contents.update(files)
            c = self._new_commit(contents, parent, message)
            parent = c.id
            shas.append(c.id.decode())
        if parent is not None:
            self.repo.refs[ref] = parent
        return shas

    def tag(self, name: str, target: str | None = None, *, annotated: bool = False,
            message: str | None = None) -> str:
        """Tag *target* (default: the default branch head). Returns the sha the ref points at: the
        commit for a lightweight tag, the tag object for an annotated one."""
        commit_sha = (target or self.head() or "").encode()
        if not commit_sha:
            raise ValueError("nothing to tag: the branch has no commits yet")
        ref = f"refs/tags/{name}".encode()
        if not annotated:
            self.repo.refs[ref] = commit_sha
            return commit_sha.decode()
        t = Tag()
        t.name = name.encode()
        t.object = (Commit, commit_sha)
        t.tagger = _AUTHOR
        self._clock += 1
        t.tag_time = self._clock
        t.tag_timezone = 0
        t.message = (message or name).encode() + b"\n"
        self.repo.object_store.add_object(t)
        self.repo.refs[ref] = t.id
        return t.id.decode()

    def many_tags(self, names: Iterable[str], target: str | None = None) -> None:
        """Lightweight-tag *target* (default: the branch head) with every name at once, written as
        packed-refs: thousands of tags in milliseconds."""
        sha = (target or self.head() or "").encode()
        if not sha:
            raise ValueError("nothing to tag: the branch has no commits yet")
        self.repo.refs.add_packed_refs({f"refs/tags/{n}".encode(): sha for n in names})

    def pack_tags(self, tags: Mapping[str, str], *, annotated: Collection[str] = ()) -> None:
        """Tag many commits at once (name -> commit sha), written as one packed-refs file. Names in
        *annotated* get annotated tag objects, and packed-refs records their peeled commits (as
        ``git pack-refs`` does), so git and dulwich readers see the commit each tag names; refs
        already packed are kept, peeled again from their objects."""
        store = self.repo.object_store
        packed = dict(self.repo.refs.get_packed_refs())
        peeled: dict[bytes, bytes] = {}
        for ref, sha in packed.items():
            obj = store[sha]
            while isinstance(obj, Tag):
                obj = store[obj.object[1]]
            if obj.id != sha:
                peeled[ref] = obj.id
        for name, commit_sha in tags.items():
            ref = f"refs/tags/{name}".encode()
            loose = Path(self.repo.controldir()) / "refs" / "tags" / name
            loose.unlink(missing_ok=True)
            if name in annotated:
                packed[ref] = self._tag_object(name, commit_sha.encode(), f"Release {name}").id
                peeled[ref] = commit_sha.encode()
            else:
                packed[ref] = commit_sha.encode()
        with GitFile(str(Path(self.repo.controldir()) / "packed-refs"), "wb") as f:
            write_packed_refs(f, packed, peeled)
        self.repo.close()
        self.repo = Repo(str(self.path))  # drop dulwich's cached packed refs

    def _tag_object(self, name: str, commit_sha: bytes, message: str) -> Tag:
        t = Tag()
        t.name = name.encode()
        t.object = (Commit, commit_sha)
        t.tagger = _AUTHOR
        self._clock += 1
        t.tag_time = self._clock
        t.tag_timezone = 0
        t.message = message.encode() + b"\n"
        self.repo.object_store.add_object(t)
        return t

    def branch(self, name: str, target: str | None = None) -> None:
        """Create or move branch *name* to *target* (default: the default branch head)."""
        sha = target or self.head()
        if not sha:
            raise ValueError("no commit to point the branch at")
        self.repo.refs[f"refs/heads/{name}".encode()] = sha.encode()

    def set_head(self, branch: str) -> None:
        """Point HEAD at *branch* (what a remote reports as its default branch)."""
        self.repo.refs.set_symbolic_ref(b"HEAD", f"refs/heads/{branch}".encode())
        self.default_branch = branch

    def delete_tag(self, name: str) -> None:
        del self.repo.refs[f"refs/tags/{name}".encode()]

    # ------------------------------------------------------------------ internals

    def _write_tree(self, files: Mapping[str, bytes]) -> bytes:
        """Write nested trees for *files* (paths with /) and return the root tree id."""
        nested: dict = {}
        for path, data in files.items():
            node = nested
            *dirs, leaf = path.split("/")
            for d in dirs:
                node = node.setdefault(d, {})
            node[leaf] = data

        def write(node: dict) -> bytes:
            tree = Tree()
            for name, value in node.items():
                if isinstance(value, dict):
                    tree.add(name.encode(), stat.S_IFDIR, write(value))
                else:
                    blob = Blob.from_string(value)
                    self.repo.object_store.add_object(blob)
                    tree.add(name.encode(), 0o100644, blob.id)
            self.repo.object_store.add_object(tree)
            return tree.id

        return write(nested)

    def _files(self, commit_sha: bytes) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        store = self.repo.object_store

        def walk(tree_id: bytes, prefix: str) -> None:
            for entry in store[tree_id].items():
                name = prefix + entry.path.decode()
                if stat.S_ISDIR(entry.mode):
                    walk(entry.sha, name + "/")
                else:
                    out[name] = store[entry.sha].data

        walk(store[commit_sha].tree, "")
        return out

    def close(self) -> None:
        self.repo.close()
