"""Namespace files: the ``/run/netns`` mount protocol of iproute2's ``ip netns add``
(ip/ipnetns.c, netns_add), so ``ip netns``, ``nsenter --net=``, ``NetworkNamespacePath=``
all work on nsd's namespaces:

1. ``mkdir`` the run dir (0755), ``flock(LOCK_EX)`` it;
2. make the run dir a mount point in a shared peer group of its own:
   ``mount --make-rshared``; on EINVAL (not a mount point yet) ``mount --rbind dir dir``,
   ``mount --make-rprivate dir`` (leaves the peer group the bind inherited from its parent,
   Debian bug 949235) and try ``--make-rshared`` again;
3. create the file (``O_CREAT|O_EXCL``, mode 0);
4. ``unshare(CLONE_NEWNET)`` on the calling thread and bind-mount
   ``/proc/thread-self/ns/net`` (not ``/proc/self``: that is the main thread's) onto it
   (step 4 belongs to the netns worker, nsd/netns_worker.py, ``mount_new_namespace``, on
   its own thread or, for a batch, on its namespace maker thread);
5. switch the thread back to the host namespace; unlock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from nsd.net import linux
from nsd.net.netns_spec import FOREIGN, NetnsError, kernel_step

log = logging.getLogger(__name__)

#: how long ensure() waits for another process (``ip netns add``) to drop the run dir lock
LOCK_TIMEOUT = 10.0


def _not_ours(st: os.stat_result) -> str | None:
    """What the object at a namespace path is, if it cannot be the empty regular file
    nsd creates as a mount point (None if it can)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None if st.st_size == 0 else "a file with content"
    kinds = {
        stat.S_ISLNK: "a symbolic link",
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "an unknown kind of file")


class NamespaceFiles:
    """The namespace files in one run dir (``/run/netns``)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        #: the device of nsfs: a path is a mounted namespace if it lives on it
        self.nsfs_dev = os.stat("/proc/self/ns/net").st_dev
        self._batching = False
        #: taken around every creation: in a batch the netns worker's namespace maker
        #: thread creates namespaces while the worker itself may have to create one
        #: that vanished (nsd/netns_worker.py); the lock fd and sharing state below are
        #: used under it
        self._creating = threading.Lock()
        #: the run dir's lock while a batch holds it (see batch())
        self._held_fd = -1
        #: the id of the run dir's mount as last made shared recursively (_take_lock)
        self._shared_mount = -1

    def namespace_inode(self, path: str) -> int | None:
        """Inode of the namespace mounted at ``path``, or None if nothing (nsfs) is mounted
        there. Only stats the path; it does not check that the namespace is a *network*
        namespace (``open_namespace`` does)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return st.st_ino if st.st_dev == self.nsfs_dev else None

    def open_namespace(self, path: str) -> int:
        """An ``O_RDONLY|O_CLOEXEC`` fd of the network namespace mounted at ``path``."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise NetnsError("open", f"{path}: {e.strerror}", e.errno) from e
        try:
            if os.fstat(fd).st_dev != self.nsfs_dev:
                raise NetnsError("open", f"{path} is not a mounted namespace", errno.EINVAL)
            if linux.ns_get_nstype(fd) != linux.CLONE_NEWNET:
                raise NetnsError("open", f"{path} is not a network namespace", errno.EINVAL)
        except OSError as e:
            os.close(fd)
            raise NetnsError("open", f"{path}: {e.strerror}", e.errno) from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Keep the run dir's lock, once a creation in the batch has taken it, until the
        batch ends: after a reboot every tenant of a batch creates its namespace, and
        locking and sharing the run dir again for each took ~5 % of the netns worker's
        time in a cold start. Another process (``ip netns add``) waits for the batch."""
        self._batching = True
        try:
            yield
        finally:
            with self._creating:
                self._batching = False
                if self._held_fd >= 0:
                    os.close(self._held_fd)  # also drops the lock
                    self._held_fd = -1

    def lock_run_dir(self, actions: list[str]) -> int:
        """Take the run dir's lock and make sure it is a shared mount point; the fd that
        holds the lock, for the caller to close, or -1 while a batch holds it."""
        if self._held_fd >= 0:
            return -1
        fd = self._take_lock(actions)
        if self._batching:
            self._held_fd = fd
            return -1
        return fd

    def _take_lock(self, actions: list[str]) -> int:
        run_dir = self.run_dir
        with kernel_step("mount", "create %s", run_dir):
            os.makedirs(os.path.dirname(run_dir), mode=0o755, exist_ok=True)
            try:
                os.mkdir(run_dir, 0o755)
                # explicit: the daemon's umask must not decide who can reach the files
                os.chmod(run_dir, 0o755)  # noqa: S103 -- world-readable like iproute2
            except FileExistsError:
                pass
            st = os.lstat(run_dir)
            if not stat.S_ISDIR(st.st_mode):
                raise NetnsError("mount", f"{run_dir} is not a directory", errno.ENOTDIR)
            lock_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NetnsError(
                            "lock", f"{run_dir} stays locked by another process", errno.EAGAIN
                        ) from None
                    time.sleep(0.01)
            # Sharing recursively (MS_REC, as iproute2 does) walks every namespace
            # mounted below, ~0.25 ms per Create at 1,000 tenants. Once this process has
            # done that on the run dir's mount, the namespaces mounted since were born
            # shared (a mount made under a shared one is), so only the run dir's own
            # mount needs to be kept shared.
            mount = self._mount_of(lock_fd)
            known = mount != -1 and mount == self._shared_mount
            self.make_run_dir_shared(actions, recursive=not known)
            if not known:
                fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    self._shared_mount = self._mount_of(fd)
                finally:
                    os.close(fd)
        except BaseException:
            os.close(lock_fd)
            raise
        return lock_fd

    @staticmethod
    def _mount_of(fd: int) -> int:
        """The mount ``fd`` was opened through, or -1 if procfs does not say (then the
        run dir is shared recursively every time, as before)."""
        try:
            return linux.mount_id(fd)
        except OSError:
            return -1

    def make_run_dir_shared(self, actions: list[str], *, recursive: bool = True) -> None:
        run_dir = self.run_dir
        made_mount = False
        flags = linux.MS_SHARED | (linux.MS_REC if recursive else 0)
        while True:
            try:
                linux.mount("", run_dir, "none", flags)
                return
            except OSError as e:
                if e.errno != errno.EINVAL or made_mount:
                    raise NetnsError(
                        "mount", f"make {run_dir} shared: {e.strerror}", e.errno
                    ) from e
            with kernel_step("mount", "make %s a mount point", run_dir):
                linux.mount(run_dir, run_dir, "none", linux.MS_BIND | linux.MS_REC)
                linux.mount("", run_dir, "none", linux.MS_PRIVATE | linux.MS_REC)
            made_mount = True
            actions.append(f"made {run_dir} a shared mount point")

    def ensure(
        self,
        path: str,
        adopt: bool,
        actions: list[str],
        mount_new_namespace: Callable[[str], None],
    ) -> tuple[int, bool]:
        """Return (fd of the namespace, adopted_existing). ``mount_new_namespace(path)``
        creates a namespace and binds it onto the (existing) file at ``path``."""
        if self.namespace_inode(path) is not None:
            return self.adopt(path, adopt), True
        with self._creating:
            lock_fd = self.lock_run_dir(actions)
            try:
                adopted_fd = self._create_locked(path, adopt, actions, mount_new_namespace)
            finally:
                if lock_fd >= 0:
                    os.close(lock_fd)  # also drops the lock
        if adopted_fd is not None:
            return adopted_fd, True
        actions.append(f"created namespace {path}")
        return self.open_namespace(path), False

    def _create_locked(
        self,
        path: str,
        adopt: bool,
        actions: list[str],
        mount_new_namespace: Callable[[str], None],
    ) -> int | None:
        """ensure()'s part under the run dir's lock: the fd of a namespace found there
        after all (adopted), or None once a new one is mounted at ``path``."""
        # Look again under the lock: another process may have been quicker.
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and st.st_dev == self.nsfs_dev:
            return self.adopt(path, adopt)
        created_file = False
        foreign = _not_ours(st) if st is not None else None
        if st is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
            except FileExistsError:
                if self.namespace_inode(path) is not None:
                    return self.adopt(path, adopt)
                raise NetnsError(
                    "mount", f"{path} is being created by someone else", errno.EEXIST
                ) from None
            except OSError as e:
                raise NetnsError("mount", f"create {path}: {e.strerror}", e.errno) from e
            os.close(fd)
            created_file = True
        elif foreign is not None:
            raise NetnsError(
                FOREIGN, f"{path} is {foreign} that nsd did not make; left in place "
                "(remove it, or choose another netns.name_template)", errno.EEXIST,
            )  # fmt: skip
        else:
            # A plain file where a namespace should be mounted: left over from a
            # namespace whose mount is gone (e.g. /run persisted, or someone
            # unmounted it). Mount a fresh namespace onto it.
            actions.append(f"found stale namespace file {path}")
        try:
            mount_new_namespace(path)
        except BaseException:
            if created_file:
                try:
                    os.unlink(path)
                except OSError:
                    log.warning("could not remove %s after a failure", path, exc_info=True)
            raise
        return None

    def adopt(self, path: str, adopt: bool) -> int:
        if not adopt:
            raise NetnsError("exists", f"{path} already holds a namespace", errno.EEXIST)
        return self.open_namespace(path)

    def remove(self, path: str, actions: list[str]) -> None:
        """Detach every mount on ``path`` and unlink it; missing is fine.

        Only what nsd makes is removed: network namespace bind mounts, and then the
        empty regular file nsd created as their mount point. Anything else at the
        path (a symbolic link, FIFO, directory, a file with content, another mount)
        was put there by someone else: it is left alone, and after everything of
        nsd's is gone a NetnsError with step ``FOREIGN`` says what it is.
        """
        with kernel_step("remove", "unmount %s", path):
            for _ in range(64):  # also undoes mounts stacked by old bugs
                if self.namespace_inode(path) is None:
                    break
                if not self.is_network_namespace(path):
                    raise NetnsError(
                        FOREIGN, f"{path} is a mount of another kind of namespace that "
                        "nsd did not make; left in place", errno.EEXIST,
                    )  # fmt: skip
                linux.umount2(path, linux.MNT_DETACH)
                actions.append(f"unmounted {path}")
        with kernel_step("remove", "unlink %s", path):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            foreign = _not_ours(st)
            if foreign is None:
                try:
                    os.unlink(path)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    foreign = "a mount point of something else"
            if foreign is not None:
                raise NetnsError(
                    FOREIGN, f"{path} is {foreign} that nsd did not make; left in place",
                    errno.EEXIST,
                )  # fmt: skip
            actions.append(f"removed {path}")

    def is_network_namespace(self, path: str) -> bool:
        try:
            os.close(self.open_namespace(path))
        except NetnsError:
            return False
        return True
