"""prep.digests: what a pipeline step's key is made of: file contents (read once per size/mtime/inode),
model folders, the files a composed recipe names, and the first-party code a command imports."""
import json
import os

from prep.config import compose
from prep.digests import DigestCache, code_files, recipe_inputs
from prep.testing.tiny_model import resolve_model
from tests.conftest import REPO_ROOT


def test_a_file_is_read_again_only_when_its_size_mtime_or_inode_changes(tmp_path):
    path, store = tmp_path / "cases.jsonl", tmp_path / "digests.json"
    path.write_text("one\n", encoding="utf-8")
    cache = DigestCache(store)
    first = cache.file(path)
    cache.save()
    stat = path.stat()
    path.write_text("two\n", encoding="utf-8")                        # same size...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))          # ...and mtime: the cached digest stands
    assert DigestCache(store).file(path) == first
    os.utime(path, (stat.st_mtime + 5, stat.st_mtime + 5))           # a new mtime: read, and the change is seen
    assert DigestCache(store).file(path) != first
    path.write_text("one\n", encoding="utf-8")                        # touched back to the first content
    assert DigestCache(store).file(path) == first


def test_a_folder_digest_covers_names_and_contents_but_not_hidden_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}", encoding="utf-8")
    cache = DigestCache(None)
    before = cache.tree(tmp_path / "m")
    (tmp_path / "m" / ".lock").write_text("x", encoding="utf-8")
    assert cache.tree(tmp_path / "m") == before
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\0" * 10)
    assert cache.tree(tmp_path / "m") != before


def test_a_recipe_names_its_prompt_files_serve_recipe_and_model_but_not_the_run_folder(tmp_path):
    teacher = compose(REPO_ROOT / "recipes/teacher/local-tiny-vllm.yaml", overrides=[f"client.base_url={tmp_path}/x"])
    names = {str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else path.name
             for path in recipe_inputs(teacher, exclude=[tmp_path], model_folder=resolve_model)}
    assert {"data/prompts/system.txt", "data/prompts/user.txt", "data/prompts/repair.txt",
            "recipes/serve/tiny-cpu.yaml"} <= names
    assert any(name.startswith(".cache/tiny-qwen2.5-") or "tiny-qwen2.5" in name for name in names)  # via the serve recipe
    assert not any(str(tmp_path) in name for name in names)


def test_a_commands_code_is_every_first_party_module_it_imports_and_no_other():
    merge = {str(path.relative_to(REPO_ROOT)) for path in code_files("launch.merge")}
    assert {"launch/merge.py", "custom_losses/train/merge.py", "prep/jsonio.py"} <= merge
    assert "prep/stages/teacher.py" not in merge and "custom_losses/kd/trainer.py" not in merge
    teacher = {str(path.relative_to(REPO_ROOT)) for path in code_files("launch.teacher")}
    assert {"prep/stages/teacher.py", "prep/api/pool.py", "prep/stages/api_stage.py"} <= teacher
    assert not any(name.startswith("custom_losses/") for name in teacher)


# ---- the one run record ----------------------------------------------------------------------------

def test_the_run_record_says_why_an_output_is_not_current(tmp_path):
    from prep.digests import RUN_RECORD, identity_difference, read_record, why_not_current, write_record

    identity = {"recipe": {"learning_rate": 0.1, "lora_r": 8}, "file:data/a.jsonl": "aa", "dep:teacher": "k1"}
    assert why_not_current(tmp_path, identity) == "not run yet"
    write_record(tmp_path / RUN_RECORD, identity, done=False, seconds=3)
    assert why_not_current(tmp_path, identity) == "did not finish"
    write_record(tmp_path / RUN_RECORD, identity, done=True)
    assert why_not_current(tmp_path, identity) is None and read_record(tmp_path)["done"] is True
    changed = {**identity, "recipe": {"learning_rate": 0.2, "lora_r": 8}, "dep:teacher": "k2"}
    assert why_not_current(tmp_path, changed) == "recipe key 'learning_rate': 0.1 -> 0.2, upstream teacher changed"
    assert identity_difference(identity, changed, recipe_keys=["lora_r"]) == "upstream teacher changed"
    assert identity_difference({"recipe": "d1", "argv": "x"}, {"recipe": "d2", "argv": "y"}) == \
        "command changed, recipe changed"
    (tmp_path / RUN_RECORD).write_text('{"identity": {"recipe"')        # cut off mid-write: no record
    assert why_not_current(tmp_path, identity) == "not run yet"
    (tmp_path / RUN_RECORD).write_text('{"key": "abc"}')                 # an older medkd's stamp
    assert why_not_current(tmp_path, identity) == "made by an older medkd, without a content key"


def test_a_models_digest_is_its_content_and_follows_an_in_place_retrain(tmp_path):
    from prep.digests import DigestCache, model_digest

    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(b"weights-1")
    (model / "tokenizer.json").write_text("{}")
    cache = DigestCache(tmp_path / "digests.json")
    first = model_digest(model, cache)
    assert model_digest(model, cache) == first
    (model / "medkd-run.json").write_text("{}")                         # its record is not its content
    (model / "checkpoint-2").mkdir()
    (model / "checkpoint-2" / "model.safetensors").write_bytes(b"old")  # nor are checkpoints below it
    assert model_digest(model, cache) == first
    (model / "model.safetensors").write_bytes(b"weights-2")             # retrained in place: same path, same size
    assert model_digest(model, cache) != first
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    with_base = model_digest(adapter, cache)
    (model / "model.safetensors").write_bytes(b"weights-3")             # an adapter's base is part of it
    assert model_digest(adapter, cache) != with_base
