"""Issue 12 §6, data: every unusable data file or data setting is refused when the dataset is
built (before any training step), with one line naming the file, row and column, and the CLI
exits 2 without a traceback.

Errors are caught as :class:`flowkit.recipe.RecipeError` (what the CLI maps to exit 2), so
each test fails on the old code for the behaviour it names, not for a missing import.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

import flowkit
from flowkit.cli import main
from flowkit.data_real import HFDataset, load_maf
from flowkit.recipe import RecipeError

pd = pytest.importorskip("pandas")


def _frame(n: int = 20) -> "pd.DataFrame":
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": rng.integers(0, 3, n),
                         "name": [f"x{i}" for i in range(n)]})


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


@pytest.fixture
def good_csv(tmp_path):
    path = tmp_path / "good.csv"
    _frame().to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------- the error type


def test_data_error_is_a_one_line_recipe_error():
    from flowkit.data import DataError

    err = DataError("t.csv: data.column: no column 'x'")
    assert isinstance(err, RecipeError) and isinstance(err, ValueError)
    assert str(err) == "t.csv: data.column: no column 'x'"


# --------------------------------------------------------------------------- columns


@pytest.mark.parametrize("column, missing", [("zzz", "'zzz'"), (["a", "zzz", "yy"], "'zzz', 'yy'")])
def test_missing_column_string_and_list_forms_name_file_and_available_columns(good_csv, column, missing):
    with pytest.raises(RecipeError) as err:
        HFDataset(str(good_csv), column=column)
    text = _one_line(err)
    assert str(good_csv) in text and "data.column" in text and missing in text
    assert "available columns: a, b, label, name" in text


def test_missing_label_column_named(good_csv):
    with pytest.raises(RecipeError) as err:
        HFDataset(str(good_csv), column=["a"], label_column="lbl")
    assert "data.label_column: no column 'lbl'; available columns: a, b, label, name" in _one_line(err)


def test_non_numeric_listed_column_names_file_row_and_value(good_csv):
    with pytest.raises(RecipeError) as err:
        HFDataset(str(good_csv), column=["a", "name"])
    assert f"{good_csv} data row 1 (line 2), column 'name': 'x0' is not a number" in _one_line(err)


def test_text_cell_in_a_numeric_column_is_not_silently_dropped(tmp_path):
    frame = _frame()
    frame["b"] = frame["b"].astype(object)
    frame.loc[6, "b"] = "oops"
    frame.to_csv(tmp_path / "mixed.csv", index=False)
    # data.column: null takes every numeric column; a column of numbers with one word in it
    # is reported, not dropped (the old loader trained on 'a' and 'label' alone)
    with pytest.raises(RecipeError) as err:
        HFDataset(str(tmp_path / "mixed.csv"))
    assert "mixed.csv data row 7 (line 8), column 'b': 'oops' is not a number" in _one_line(err)
    # text columns (no number in them) are still left out
    assert HFDataset(str(tmp_path / "mixed.csv"), column=["a", "label"]).shape == (2,)
    frame.drop(columns="b").to_csv(tmp_path / "text.csv", index=False)
    assert HFDataset(str(tmp_path / "text.csv")).shape == (2,)  # a, label; 'name' is text


def test_string_class_labels_are_refused_with_the_row(good_csv):
    with pytest.raises(RecipeError) as err:
        HFDataset(str(good_csv), column=["a"], label_column="name")
    assert "data row 1 (line 2), column 'name'" in _one_line(err) and "data.label_column" in str(err.value)


# --------------------------------------------------------------------------- non-finite cells


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_nan_and_inf_cells_named_at_load_with_row_column_and_count(tmp_path, suffix):
    frame = _frame()
    frame.loc[3, "a"] = np.nan
    frame.loc[7, "b"] = np.inf
    frame.loc[9, "b"] = -np.inf
    path = tmp_path / f"bad{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    with pytest.raises(RecipeError) as err:
        HFDataset(str(path), column=["a", "b"])
    text = _one_line(err)
    row = "data row 4 (line 5)" if suffix == ".csv" else "row 4"
    assert f"{path} {row}, column 'a': an empty or NaN cell" in text
    assert "3 empty or non-finite cells in all, in 3 rows" in text


def test_empty_cell_and_huge_value_refused(tmp_path):
    (tmp_path / "gap.csv").write_text("a,b\n1,2\n3,\n4,5\n6,7\n")
    with pytest.raises(RecipeError, match=r"gap.csv data row 2 \(line 3\), column 'b': an empty or NaN cell"):
        HFDataset(str(tmp_path / "gap.csv"))
    (tmp_path / "big.csv").write_text("a,b\n1,2\n3,1e39\n4,5\n6,7\n")
    with pytest.raises(RecipeError, match="beyond float32's range"):
        HFDataset(str(tmp_path / "big.csv"), standardise=False)
    assert torch.isfinite(HFDataset(str(tmp_path / "big.csv")).train).all()  # standardised in float64


# --------------------------------------------------------------------------- empty and malformed tables


@pytest.mark.parametrize("text, expected", [
    ("a,b\n", "no data rows (only a header line)"),
    ("", "the file is empty"),
    ("a,b\n1,2\n3,4,5\n", "Expected 2 fields in line 3"),
    ("a,b\n1,2,9\n3,4,8\n", "rows hold more fields than the header"),
])
def test_empty_or_malformed_csv_named(tmp_path, text, expected):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        HFDataset(str(path))
    assert str(path) in _one_line(err) and expected in str(err.value)


def test_corrupt_parquet_named(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(RecipeError, match=r"t.parquet: data.path: cannot read it as parquet"):
        HFDataset(str(tmp_path / "t.parquet"))


def test_too_few_rows_to_hold_out_refused(tmp_path):
    (tmp_path / "one.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RecipeError, match="one.csv: data.test_fraction: 1 row, and holding out 1 leaves none"):
        HFDataset(str(tmp_path / "one.csv"))
    (tmp_path / "two.csv").write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(RecipeError, match="data.standardise: one training row"):
        HFDataset(str(tmp_path / "two.csv"))


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kwargs, key", [
    ({"test_fraction": 0.0}, "data.test_fraction"), ({"test_fraction": 1.0}, "data.test_fraction"),
    ({"test_fraction": -0.1}, "data.test_fraction"), ({"test_fraction": math.nan}, "data.test_fraction"),
    ({"test_fraction": math.inf}, "data.test_fraction"), ({"limit": 0}, "data.limit"), ({"limit": -5}, "data.limit"),
    ({"alpha": 0.5}, "data.alpha"), ({"alpha": -1e-3}, "data.alpha"), ({"alpha": math.nan}, "data.alpha"),
    ({"column": []}, "data.column"), ({"test_split": "train"}, "data.test_split"),
])
def test_invalid_hf_settings_refused(good_csv, kwargs, key):
    with pytest.raises(RecipeError) as err:
        HFDataset(str(good_csv), **kwargs)
    assert _one_line(err).startswith(key)


@pytest.mark.parametrize("name, kwargs, key", [
    ("digits", {"test_fraction": 0.0}, "data.test_fraction"),
    ("digits", {"test_fraction": 1e-5}, "data.test_fraction"),  # rounds to no test image
    ("digits", {"alpha": 0.5}, "data.alpha"),
    ("sierpinski", {"depth": 0}, "data.depth"),
    ("fractal_tree", {"depth": 21}, "data.depth"),  # 2^21 branches; 2^40 would run out of memory
    ("fractal_tree", {"angle": math.inf}, "data.angle"),
    ("fractal_tree", {"ratio": math.nan}, "data.ratio"),
    ("fractal_tree", {"noise": -0.1}, "data.noise"),
    ("olympic_rings", {"radius": math.inf}, "data.radius"),
    ("concentric_rings", {"radius_std": math.nan}, "data.radius_std"),
    ("gmm", {"dim": 0}, "data.dim"),
    ("gmm", {"seed": -1}, "data.seed"),
])
def test_invalid_dataset_settings_refused_with_the_key(name, kwargs, key):
    with pytest.raises(RecipeError) as err:
        flowkit.DATASETS.build(name, **kwargs)
    assert _one_line(err).startswith(key)


def test_maf_split_name_checked(tmp_path):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power/data.npy", np.random.default_rng(0).normal(size=(50, 8)))
    assert flowkit.DATASETS.build("power", root=str(tmp_path), split="validation").test.shape == (4, 6)
    with pytest.raises(RecipeError) as err:  # the old loader quietly used the validation rows
        flowkit.DATASETS.build("power", root=str(tmp_path), split="val")
    assert _one_line(err).startswith("data.split: must be one of test, validation, got 'val'")


def test_standardized_inner_set_problems_are_data_errors():
    with pytest.raises(RecipeError, match="data.data: standardized takes continuous data"):
        flowkit.DATASETS.build("standardized", data=flowkit.DATASETS.build("digits"))
    with pytest.raises(RecipeError, match="data.reference"):
        flowkit.DATASETS.build("standardized", data=flowkit.DATASETS.build("moons"), reference=math.inf)


# --------------------------------------------------------------------------- folders of tables


def test_folder_split_files_are_used_not_the_same_rows_twice(tmp_path):
    frame = _frame()
    (tmp_path / "d").mkdir()
    frame.iloc[:15].to_csv(tmp_path / "d/train.csv", index=False)
    frame.iloc[15:].to_csv(tmp_path / "d/test.csv", index=False)
    data = HFDataset(str(tmp_path / "d"), column=["a", "b"], standardise=False)
    assert len(data.train) == 15 and len(data.test) == 5  # the old loader read both files as both splits
    assert torch.allclose(data.test, torch.tensor(frame[["a", "b"]].iloc[15:].to_numpy(), dtype=torch.float32))
    (tmp_path / "d/notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RecipeError, match="notes.csv is named for neither split 'train' nor 'test'"):
        HFDataset(str(tmp_path / "d"))


def test_folder_files_row_numbers_are_per_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/part1.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "d/part2.csv").write_text("a,b\n5,6\n7,nan\n")
    with pytest.raises(RecipeError, match=r"part2.csv data row 2 \(line 3\), column 'b'"):
        HFDataset(str(tmp_path / "d"))
    (tmp_path / "d/part3.csv").write_text("a,c\n5,6\n")
    with pytest.raises(RecipeError, match="part3.csv: data.path: its columns .* differ"):
        HFDataset(str(tmp_path / "d"))


# --------------------------------------------------------------------------- images


@pytest.fixture
def image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "img"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            arr = np.random.default_rng(i).integers(0, 256, (6, 6), dtype=np.uint8)
            Image.fromarray(arr, mode="L").save(root / label / f"{i}.png")
    return root


def test_corrupt_and_truncated_images_named(image_folder):
    (image_folder / "dog/bad.png").write_bytes(b"not a png")
    with pytest.raises(RecipeError) as err:
        HFDataset(str(image_folder))
    assert _one_line(err).startswith(f"{image_folder / 'dog/bad.png'}: cannot decode this image")
    good = (image_folder / "cat/0.png").read_bytes()
    (image_folder / "dog/bad.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(RecipeError, match="bad.png: cannot decode this image"):
        HFDataset(str(image_folder))


def test_differently_sized_images_named_with_expected_and_found_size(image_folder):
    from PIL import Image

    Image.fromarray(np.zeros((7, 6), np.uint8)).save(image_folder / "dog/tall.png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(image_folder / "dog/rgb.png")
    with pytest.raises(RecipeError) as err:
        HFDataset(str(image_folder))
    text = _one_line(err)
    assert f"{image_folder / 'dog/rgb.png'}: the image is 6x6 pixels with 3 channels, expected 6x6 pixels with " \
           "1 channel" in text
    assert "(2 of 8 images have a problem)" in text


def test_16_bit_images_refused_and_palette_images_use_their_colours(image_folder):
    from PIL import Image

    Image.fromarray(np.full((6, 6), 300, np.uint16)).save(image_folder / "dog/deep.png")
    with pytest.raises(RecipeError, match="deep.png: a I;16 image"):  # the old loader wrapped 300 to 44
        HFDataset(str(image_folder))
    (image_folder / "dog/deep.png").unlink()
    for folder in ("cat", "dog"):
        for p in (image_folder / folder).iterdir():
            rgb = np.zeros((6, 6, 3), np.uint8)
            rgb[..., 0] = 200
            Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(p)
    x, _ = HFDataset(str(image_folder)).test_set(1)
    assert x.shape == (1, 3, 6, 6) and x[0, 0].min() > 190 / 256  # red 200, not palette index 0


def test_images_stored_in_parquet_are_checked_by_row(tmp_path):
    # how HF `datasets` exports (and the hub serves) images: {bytes, path} records
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images = [Image.fromarray(np.full((5, 5), 20 * i, np.uint8)) for i in range(10)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))})
    datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(10)]}, features=features) \
        .to_parquet(tmp_path / "imgs.parquet")
    data = HFDataset(str(tmp_path / "imgs.parquet"), label_column="label")
    assert data.shape == (1, 5, 5) and data.num_classes == 4  # class names kept from the file
    frame = pd.read_parquet(tmp_path / "imgs.parquet")
    frame.at[3, "img"] = {"bytes": b"\x89PNG broken", "path": None}
    frame.to_parquet(tmp_path / "broken.parquet")
    with pytest.raises(RecipeError, match=r"broken.parquet row 4: cannot decode this image"):
        HFDataset(str(tmp_path / "broken.parquet"))


# --------------------------------------------------------------------------- MAF tables


def test_maf_non_finite_cell_named(tmp_path):
    (tmp_path / "power").mkdir()
    data = np.random.default_rng(0).normal(size=(50, 8))
    data[12, 4] = np.nan
    data[30, 0] = np.inf
    np.save(tmp_path / "power/data.npy", data)
    with pytest.raises(RecipeError) as err:
        load_maf("power", tmp_path)
    assert "power/data.npy row 13, column 5: an empty or NaN cell (2 empty or non-finite cells" in _one_line(err)


@pytest.mark.parametrize("array, expected", [
    (np.zeros((50, 7)), "expected a 2-D array of numbers with 8 columns, found shape (50, 7)"),
    (np.zeros((5, 8)), "5 rows; MAF's split"),
    (np.array(["a", "b"]), "expected a 2-D array of numbers"),
])
def test_maf_malformed_arrays_refused(tmp_path, array, expected):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power/data.npy", array)
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_maf("power", tmp_path)


def test_maf_corrupt_file_and_zero_signal_rows_refused(tmp_path):
    (tmp_path / "miniboone").mkdir()
    (tmp_path / "miniboone/data.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(RecipeError, match="miniboone/data.npy: data.root: cannot read this .npy file"):
        load_maf("miniboone", tmp_path)
    (tmp_path / "hepmass").mkdir()
    table = pd.DataFrame(np.random.default_rng(0).normal(size=(30, 4)), columns=["# label", "f0", "f1", "mass"])
    table["# label"] = 0.0  # background only: nothing left after MAF's filter
    for name in ("1000_train.csv", "1000_test.csv"):
        table.to_csv(tmp_path / "hepmass" / name, index=False)
    with pytest.raises(RecipeError, match="1000_train.csv: data.root: no row has label 1"):
        load_maf("hepmass", tmp_path)


def test_maf_gas_text_column_named(tmp_path):
    (tmp_path / "gas").mkdir()
    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(40, 3)), columns=["s0", "s1", "s2"])
    frame["s1"] = frame["s1"].astype(object)
    frame.loc[5, "s1"] = "n/a?"
    frame.to_pickle(tmp_path / "gas/ethylene_CO.pickle")
    with pytest.raises(RecipeError, match=r"ethylene_CO.pickle row 6, column 's1': 'n/a\?' is not a number"):
        load_maf("gas", tmp_path)


# --------------------------------------------------------------------------- through the CLI


def _recipe(tmp_path, data: dict):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "data": data, "dynamics": {"name": "mlp", "hidden": [8]}, "objective": {"name": "cfm"},
        "sampler": {"name": "euler", "steps": 2}, "train": {"steps": 2, "batch_size": 4, "log_every": 1},
    }))
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda d: (_frame().assign(a=lambda f: f.a.where(f.index != 4)).to_csv(d / "t.csv", index=False),
                {"name": "hf", "path": str(d / "t.csv"), "column": ["a", "b"]}),
     "t.csv data row 5 (line 6), column 'a': an empty or NaN cell"),
    (lambda d: (_frame().to_csv(d / "t.csv", index=False), {"name": "hf", "path": str(d / "t.csv"), "column": "zzz"}),
     "t.csv: data.column: no column 'zzz'; available columns: a, b, label, name"),
])
def test_cli_train_refuses_bad_data_with_exit_2_before_any_work(tmp_path, capsys, make, expected):
    _, data = make(tmp_path)
    if not (tmp_path / "t.csv").exists():
        _frame().to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "run"
    code = main(["train", str(_recipe(tmp_path, data)), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run directory was made


@pytest.mark.parametrize("setting", ["data.test_fraction=0", "data.limit=-1", "data.alpha=0.5"])
def test_cli_check_refuses_declared_data_settings(tmp_path, capsys, setting):
    # the ranges are declared in the constructors' annotations, so `flowkit check` (which
    # builds nothing) refuses them too
    _frame().to_csv(tmp_path / "t.csv", index=False)
    recipe = _recipe(tmp_path, {"name": "hf", "path": str(tmp_path / "t.csv")})
    assert main(["check", str(recipe), setting]) == 2
    err = capsys.readouterr().err
    assert setting.split("=")[0] in err and "Traceback" not in err


def test_cli_train_refuses_corrupt_image_with_exit_2(image_folder, tmp_path, capsys):
    (image_folder / "cat/1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recipe = _recipe(tmp_path, {"name": "hf", "path": str(image_folder)})
    code = main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cat/1.png: cannot decode this image" in err and "Traceback" not in err
