"""The demo's --docs copy: every README picture and table under its docs name, paths made relative."""

from monai_ood.demo import DOCS_FILES, DOCS_PLOTS, _copy_to_docs


def test_docs_copy_names_every_file_and_strips_the_demo_folder(tmp_path):
    output = tmp_path / "demo"
    for name in DOCS_FILES:
        path = output / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            path.write_bytes(b"\x89PNG fake " + name.encode())
        else:
            path.write_text(f'{{"input": "{output.resolve()}/inputs/case.nii.gz", "of": "{name}"}}')
    for folder in DOCS_PLOTS:
        (output / folder / "plots").mkdir(parents=True, exist_ok=True)
        (output / folder / "plots" / "checkpoint_roc.png").write_bytes(folder.encode())
    (output / "triage.png").unlink()  # a picture that could not be made (no chromium) is skipped
    docs = tmp_path / "docs"
    _copy_to_docs(output, docs)
    written = sorted(str(p.relative_to(docs)) for p in docs.rglob("*") if p.is_file())
    expected = sorted(
        [target for name, target in DOCS_FILES.items() if name != "triage.png"]
        + [f"plots/{prefix}checkpoint_roc.png" for prefix in DOCS_PLOTS.values()]
    )
    assert written == expected
    table = (docs / "folders_evaluation.json").read_text()
    assert str(tmp_path) not in table and '"inputs/case.nii.gz"' in table
    assert '"of": "evaluation_folders/evaluation.json"' in table
    assert (docs / "plots" / "folders_checkpoint_roc.png").read_bytes() == b"evaluation_folders"
    assert (docs / "montage.png").read_bytes() == b"\x89PNG fake montage.png"
