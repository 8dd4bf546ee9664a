"""Copy-paste augmentation on the CamVid sample: alignment, chosen classes only, training images
only, more pixels of the pasted classes in the batches the trainer draws, seeding, bad settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.conftest import tiny_config
from trainables.config import resolve
from trainables.copypaste import CopyPaste, build_copy_paste, choose_classes, find_instances
from trainables.dataset import SegDataset, build_transforms
from trainables.errors import ConfigError
from trainables.loop import FoldTrainer

TRAIN, VAL = list(range(0, 72, 2)), list(range(1, 72, 2))
PALETTE = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)  # one colour per label
MARKER = np.array([1, 2, 3], dtype=np.uint8)  # a colour no class has
PASTE = {"augment.copy_paste": 1.0, "augment.hflip": 0.0}


def painted(sample, i):
    """The real mask of item i with an image that is its labels' colours: any misaligned paste shows."""
    mask = sample.read_mask(i)
    return PALETTE[mask], mask


def build(sample, indices, load, **settings) -> CopyPaste:
    augment = resolve({"augment.copy_paste": 1.0, **settings})["augment"]
    return build_copy_paste(augment, sample, indices, load, sample.pixel_counts, seed=0)


def pasted_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return before != after


def test_rarest_classes_by_pixel_share(sample):
    names = [sample.class_names[c] for c in choose_classes(3, sample, sample.pixel_counts)]
    share = sample.pixel_counts / sample.pixel_counts.sum()
    rarest = sorted(range(1, sample.num_classes), key=lambda c: share[c])[:3]
    assert names == [sample.class_names[c] for c in sorted(rarest)] and "background" not in names
    assert choose_classes(["Bicyclist", 9], sample, sample.pixel_counts) == [9, sample.class_names.index("Bicyclist")]
    assert choose_classes(99, sample, sample.pixel_counts) == list(range(1, 12))  # more than there are: all


def test_instances_are_components_of_chosen_classes(sample):
    classes = choose_classes(["Pedestrian", "Car"], sample, sample.pixel_counts)
    instances = find_instances(lambda i: (None, sample.read_mask(i)), TRAIN, sample.presence, classes)
    assert {inst.cls for inst in instances} == set(classes)
    assert {inst.index for inst in instances} <= set(TRAIN)
    for inst in instances[:50]:
        y0, y1, x0, x1 = inst.box
        labels = sample.read_mask(inst.index)[y0:y1, x0:x1]
        assert (labels[inst.pixels] == inst.cls).all()


def interior(where: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pasted pixels whose 5x5 neighbourhood is pasted with the same label (no interpolated rim)."""
    inner = np.zeros_like(where)
    for c in np.unique(mask[where]):
        inner |= ndimage.binary_erosion(where & (mask == c), np.ones((5, 5)))
    return inner


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.1, 2.0)])
def test_pasted_image_pixels_match_the_pasted_labels(sample, scale):
    """Images painted from their masks: after pasting, image == colour of the new mask, exactly
    everywhere at scale 1 (random flips and places); at 0.1-2x inside the interpolated rims."""
    paste = build(sample, TRAIN, lambda i: painted(sample, i), **{"augment.copy_paste_scale": list(scale)})
    changed = agree = 0
    for i in TRAIN:
        image, mask = painted(sample, i)
        new_image, new_mask = paste(image, mask, index=i)
        assert new_image.shape == image.shape and new_mask.shape == mask.shape
        assert (image == painted(sample, i)[0]).all()  # the (cached) input is not modified
        if scale == (1.0, 1.0):
            assert (new_image == PALETTE[new_mask]).all()
        inner = interior(pasted_pixels(mask, new_mask), new_mask)
        changed += inner.sum()
        agree += (new_image[inner] == PALETTE[new_mask[inner]]).all(1).sum()
    assert changed > 1000
    assert agree / changed > 0.99


def test_only_chosen_classes_are_pasted(sample):
    chosen = choose_classes(["Pedestrian", "Bicyclist"], sample, sample.pixel_counts)
    paste = build(sample, TRAIN, lambda i: painted(sample, i), **{"augment.copy_paste_classes": chosen})
    seen = set()
    for i in TRAIN:
        image, mask = painted(sample, i)
        _, new_mask = paste(image, mask, index=i)
        seen |= set(np.unique(new_mask[pasted_pixels(mask, new_mask)]).tolist())
    assert seen == set(chosen)


def test_never_pastes_from_validation_images(sample, monkeypatch):
    """Validation images are the most tempting sources (all Pedestrian, a unique colour); the
    trainer's copy-paste must neither read them nor paste their pixels."""
    read = []
    original = SegDataset.load

    def load(self, i):
        read.append(i)
        if i in VAL:
            h, w = sample.sizes[i]
            return np.broadcast_to(MARKER, (h, w, 3)).copy(), np.full((h, w), 10, dtype=np.uint8)
        return original(self, i)

    monkeypatch.setattr(SegDataset, "load", load)
    cfg = tiny_config(**PASTE, **{"augment.copy_paste_max": 5, "train.batch_size": 12})
    trainer = FoldTrainer(cfg, sample, TRAIN, VAL, fold=0)
    paste = trainer.train_set.copy_paste
    assert {inst.index for insts in paste.by_class.values() for inst in insts} <= set(TRAIN)
    before = len(read)
    for i in TRAIN:
        image, mask = paste(*original(trainer.train_set, i), index=i)
        assert not (image == MARKER).all(-1).any()
    assert set(read) <= set(TRAIN) and len(read) > before  # it did read sources, all of them training images


def class_share(loader, classes, batches) -> float:
    hits = total = 0
    for b, (_, target) in enumerate(loader):
        if b == batches:
            break
        hits += torch.isin(target, torch.tensor(classes)).sum().item()
        total += target.numel()
    return hits / total


def test_pasted_classes_gain_pixel_share_in_training_batches(sample):
    train_idx = list(range(72))
    base = FoldTrainer(tiny_config(), sample, train_idx, VAL[:2], fold=0)
    pasted = FoldTrainer(tiny_config(**PASTE), sample, train_idx, VAL[:2], fold=0)
    classes = pasted.train_set.copy_paste.classes
    assert len(classes) == 3
    share_base, share_pasted = class_share(base.train_loader, classes, 6), class_share(pasted.train_loader, classes, 6)
    assert share_pasted > 1.5 * share_base, (share_base, share_pasted)


def test_pastes_are_seeded_by_epoch_and_position(sample):
    """What is pasted depends on (seed, epoch, position) only: a fresh or resumed trainer pastes the
    same, another epoch pastes differently (hflip is off: targets depend on copy-paste only)."""
    cfg = tiny_config(**PASTE, **{"train.max_train_batches": 1})
    first = FoldTrainer(cfg, sample, TRAIN, VAL[:2], fold=0)
    next(first.epochs())
    first.set_epoch(1)
    expected = [first.train_set[k][1] for k in range(4)]
    second = FoldTrainer(cfg, sample, TRAIN, VAL[:2], fold=0)
    second.load_state_dict(first.state_dict())
    second.set_epoch(second.epoch)
    assert all(torch.equal(second.train_set[k][1], t) for k, t in enumerate(expected))
    second.set_epoch(0)
    assert not all(torch.equal(second.train_set[k][1], t) for k, t in enumerate(expected))


def test_multilabel_masks_paste_the_whole_label_vector(sample_cache):
    from tests.conftest import SAMPLE_DIR
    from trainables.data import load_dataset

    data = load_dataset(SAMPLE_DIR / "annotations-multilabel.json", task="multilabel", cache_dir=sample_cache)
    dataset = SegDataset(data, TRAIN, build_transforms(resolve({})["augment"], [64, 96], True, 0))
    paste = build(data, TRAIN, dataset.load, **{"augment.copy_paste_classes": ["Car", "Pedestrian"]})
    car, dynamic = data.class_names.index("Car"), data.class_names.index("Dynamic")
    changed = 0
    for i in TRAIN[:12]:
        image, mask = dataset.load(i)
        _, new_mask = paste(image, mask, index=i)
        where = (new_mask != mask).any(-1)
        changed += where.sum()
        assert (new_mask[where][:, dynamic] == 1).all()  # Car and Pedestrian are both Dynamic
        assert (new_mask[where][:, car] <= 1).all()
    assert changed > 0


@pytest.mark.parametrize("key, value, message", [
    ("augment.copy_paste", 1.5, "expected a probability"),
    ("augment.copy_paste_scale", [2.0, 0.5], "0 < low <= high"),
    ("augment.copy_paste_scale", 0.5, "0 < low <= high"),
    ("augment.copy_paste_max", 0, "integer >= 1"),
    ("augment.copy_paste_classes", ["Unicorn"], "unknown class 'Unicorn'"),
    ("augment.copy_paste_classes", ["background"], "is the background"),
    ("augment.copy_paste_classes", 0, "at least 1 rarest class"),
    ("augment.copy_paste_classes", "Pedestrian", "a list of class names"),
])
def test_bad_settings_are_one_line_config_errors(sample, key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(sample, TRAIN, sample.read_mask, **{key: value})
    assert err.value.key == key and "\n" not in str(err.value)


def test_search_space_accepts_the_settings(tmp_path):
    from tune.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text("fixed: {augment: {copy_paste_scale: [0.2, 1.5]}}\nspace:\n"
                    "  augment.copy_paste: {choice: [0.0, 0.5, 1.0]}\n"
                    "  augment.copy_paste_classes: {choice: [3, [Pedestrian, Bicyclist]], "
                    "when: {augment.copy_paste: [0.5, 1.0]}}\n"
                    "  train.oversample: {choice: [0.0, 1.0, 2.0]}\n")
    spec = load_space(str(path), tmp_path)
    assert spec.space["augment.copy_paste_classes"].choices == [3, ["Pedestrian", "Bicyclist"]]
    assert spec.fixed["augment"]["copy_paste_scale"] == [0.2, 1.5]
    path.write_text("fixed: {augment: {copy_paste_scale: [2.0, 1.0]}}\nspace:\n  train.oversample: {choice: [0, 1]}\n")
    with pytest.raises(ConfigError, match=r"augment.copy_paste_scale: expected \[low, high\]"):
        load_space(str(path), tmp_path)
