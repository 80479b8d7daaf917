"""qwen3vl-serve --settings-file: KEY=VALUE lines as --set pairs, --set over them, clear errors."""

from dataclasses import fields

import pytest

from qwen3vl_triton.serve.launcher import main, parse_args, settings_file_pairs, settings_of
from qwen3vl_triton.serve.repository import Settings


def write(tmp_path, text: str):
    path = tmp_path / "serving.env"
    path.write_text(text, encoding="utf-8")
    return path


def test_file_values_are_applied_and_comments_and_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "# limits\n\nmax_seq_len=2048\n  max_output_len = 512  \n# dtype=bfloat16\n"
                           "image_url_hosts=a.example,b.example\n")
    settings = settings_of(parse_args(["--settings-file", str(path)]))
    assert settings.max_seq_len == 2048
    assert settings.max_output_len == 512
    assert settings.image_url_hosts == "a.example,b.example"
    assert settings.dtype == Settings().dtype  # the commented line is not a setting
    assert settings_file_pairs(path) == ["max_seq_len=2048", "max_output_len=512",
                                         "image_url_hosts=a.example,b.example"]


def test_set_on_the_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, "max_seq_len=2048\nmax_output_len=512\n")
    settings = settings_of(parse_args(["--set", "max_output_len=256", "--settings-file", str(path)]))
    assert settings.max_output_len == 256  # --set wins wherever it stands
    assert settings.max_seq_len == 2048  # the file's value where --set says nothing


def test_the_last_line_of_a_key_wins(tmp_path):
    path = write(tmp_path, "max_queue_size=8\nmax_queue_size=32\n")
    assert settings_of(parse_args(["--settings-file", str(path)])).max_queue_size == 32


def test_without_a_file_the_defaults_stand():
    assert settings_of(parse_args([])) == Settings()


def test_an_unknown_key_names_the_key_the_file_and_the_line(tmp_path):
    path = write(tmp_path, "max_seq_len=2048\n\nmax_sequence_length=4096\n")
    with pytest.raises(SystemExit) as exc:
        settings_file_pairs(path)
    message = str(exc.value)
    assert f"--settings-file {path}, line 3: unknown setting 'max_sequence_length'" in message
    assert all(f.name in message for f in fields(Settings))  # the known ones are listed


def test_a_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path):
    path = write(tmp_path, "max_seq_len=lots\n")
    with pytest.raises(SystemExit, match=r"line 1: max_seq_len='lots' is not a valid int"):
        settings_file_pairs(path)


def test_a_line_without_a_value_is_refused(tmp_path):
    path = write(tmp_path, "max_seq_len\n")
    with pytest.raises(SystemExit, match=r"line 1: expected KEY=VALUE, got 'max_seq_len'"):
        settings_file_pairs(path)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "absent.env"
    with pytest.raises(SystemExit, match=rf"--settings-file {missing}: cannot read it"):
        settings_file_pairs(missing)


def test_check_reads_the_file(tmp_path, tiny_checkpoint, capsys):
    """--check judges the settings the file gives: an output bound that leaves no room for a prompt."""
    path = write(tmp_path, "max_seq_len=512\nmax_output_len=512\n")
    code = main(["--check", "--checkpoint", str(tiny_checkpoint), "--settings-file", str(path)])
    assert code == 1
    assert "max_output_len 512 leaves no room for a prompt in max_seq_len 512" in capsys.readouterr().out
    fixed = main(["--check", "--checkpoint", str(tiny_checkpoint), "--settings-file", str(path),
                  "--set", "max_output_len=256"])
    assert fixed == 0
