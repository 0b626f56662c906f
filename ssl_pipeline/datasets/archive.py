"""Reading the members of a .tar, .tar.gz or .zip archive safely, without extracting it to disk.

Every member is checked before its bytes are read: its name must stay inside the archive (no absolute
path, no `..`), it must be a regular file or a directory (links, devices and fifos are rejected), and
the sizes are bounded (per member, in total, and in count), so a hostile or broken archive cannot
write outside the target, point at other files, or fill the memory. The size check counts the bytes
actually read, not only what the header declares.
"""
import lzma
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


class ArchiveError(ValueError):
    """The archive or one of its members is unsafe or unreadable; the message names both."""


@dataclass(frozen=True)
class Limits:
    member_bytes: int = 4 << 30  # 4 GiB: STL-10's unlabeled_X.bin is 2.8 GB
    total_bytes: int = 8 << 30
    members: int = 2_000_000


def safe_name(archive: Path, name: str) -> str:
    """The member's path inside the archive, or ArchiveError if it could escape the target."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"{archive}: member {name!r} contains '..', which could escape the target directory")
    return str(path)


class Budget:
    def __init__(self, archive: Path, limits: Limits):
        self.archive, self.limits, self.total, self.count = archive, limits, 0, 0

    def admit(self, name: str, declared: int) -> None:
        self.count += 1
        if self.count > self.limits.members:
            raise ArchiveError(f"{self.archive}: more than {self.limits.members:,} members")
        self.check(name, declared)

    def check(self, name: str, size: int) -> None:
        if size > self.limits.member_bytes:
            raise ArchiveError(f"{self.archive}: member {name!r} is {size:,} bytes, over the limit of "
                               f"{self.limits.member_bytes:,} per member")
        if self.total + size > self.limits.total_bytes:
            raise ArchiveError(f"{self.archive}: expands past the limit of {self.limits.total_bytes:,} bytes "
                               f"at member {name!r}")

    def read(self, name: str, handle) -> bytes:
        """Read at most one byte past the member limit, whatever the header declared."""
        data = handle.read(self.limits.member_bytes + 1)
        self.check(name, len(data))
        self.total += len(data)
        return data


def tar_members(archive: Path, budget: Budget, wanted, directories: bool):
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = safe_name(archive, member.name)
            if member.issym() or member.islnk():
                raise ArchiveError(f"{archive}: member {name!r} is a link (to {member.linkname!r}); links are rejected")
            if member.isdir():
                if directories:
                    yield name, None
                continue
            if not member.isfile():
                raise ArchiveError(f"{archive}: member {name!r} is not a regular file")
            budget.admit(name, member.size)
            if wanted(name):
                yield name, budget.read(name, tar.extractfile(member))


def zip_members(archive: Path, budget: Budget, wanted, directories: bool):
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            name = safe_name(archive, info.filename).rstrip("/")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # S_IFLNK in the Unix mode bits
                raise ArchiveError(f"{archive}: member {name!r} is a symbolic link; links are rejected")
            if info.is_dir():
                if directories:
                    yield name, None
                continue
            budget.admit(name, info.file_size)
            if wanted(name):
                with bundle.open(info) as handle:
                    yield name, budget.read(name, handle)


def read_members(archive, wanted=lambda name: True, limits: Limits = Limits(), directories: bool = False):
    """Yield (name, bytes) of the regular-file members `wanted(name)` selects, checking every member of
    the archive (selected or not) as it goes; with `directories`, also (name, None) per directory."""
    archive = Path(archive)
    budget = Budget(archive, limits)
    try:
        if zipfile.is_zipfile(archive):
            yield from zip_members(archive, budget, wanted, directories)
        else:
            yield from tar_members(archive, budget, wanted, directories)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError,
            NotImplementedError, RuntimeError) as error:  # corrupt data, unsupported or encrypted zip members
        raise ArchiveError(f"{archive}: not a readable .tar, .tar.gz or .zip archive ({type(error).__name__}: "
                           f"{error})") from error
