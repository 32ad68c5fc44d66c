"""psb_fast.files: every bad JSON / TOML file is one ValueError line naming the file and its role."""

import pytest

from psb_fast.files import read_json, read_toml


def test_good_files_are_read(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2.5, null], "y": NaN}')
    (tmp_path / "a.toml").write_text('x = 1\n[t]\ny = "z"\n')
    value = read_json(tmp_path / "a.json", "test file")
    assert value["x"] == [1, 2.5, None] and value["y"] != value["y"]
    assert read_toml(tmp_path / "a.toml", "test file") == {"x": 1, "t": {"y": "z"}}


@pytest.mark.parametrize("name, content, message", [
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nests deeper than Python can parse"),
    ("deep.toml", b"x = " + b"[" * 100_000 + b"]" * 100_000, "nests deeper than Python can parse"),
    ("deep2.toml", b"x = " + b"{a = " * 50_000 + b"1" + b"}" * 50_000, "nests deeper than Python can parse"),
    ("bin.json", b"\xff\xfe\x00binary", r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    ("bin.toml", b"x = 1\n\xc3", r"is not UTF-8 text \(byte 0xc3 at offset 6\)"),
    ("bad.json", b'{"x": ', "is not valid JSON: Expecting value"),
    ("bad.toml", b"x = = 1", "is not valid TOML"),
    ("twice.json", b'{"settings": {"10": 1, "010": 2, "10": 3}}', "repeats the key '10' in one object"),
    ("twice.toml", b"x = 1\nx = 2\n", "is not valid TOML"),
])
def test_bad_files_give_one_line_naming_file_and_role(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    read = read_json if name.endswith(".json") else read_toml
    with pytest.raises(ValueError, match=message) as info:
        read(path, "tuned-settings file")
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"tuned-settings file {str(path)!r} ")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file '.*nope.toml' does not exist"):
        read_toml(tmp_path / "nope.toml", "config file")
    with pytest.raises(ValueError, match=r"shard plan '.*' is a folder, expected a file"):
        read_json(tmp_path, "shard plan")
