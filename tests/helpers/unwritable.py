"""A folder path that this process can neither create nor write to, wherever the tests run."""

from pathlib import Path


def unwritable_folder(tmp_path: Path) -> tuple[Path, str]:
    """(path, the OS's reason) of a folder this process cannot use: an existing read-only folder
    ("Permission denied"), or, where chmod does not stop this user (root), a path below a file,
    which no one can create ("Not a directory")."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        (read_only / "probe").mkdir()
    except PermissionError:
        return read_only, "Permission denied"
    (read_only / "probe").rmdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    return a_file / "out", "Not a directory"
