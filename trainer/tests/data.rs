//! Datasets, epoch order, sharding and the loader.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use kiln_tests::TempDir;
use kiln_trainer::TrainError;
use kiln_trainer::data::{
    Batch, Dataset, FashionMnist, FolderOptions, ImageFolder, Loader, Normalize, Split, TextClassification,
    TextOptions, epoch_order, epoch_seed, shard_batches,
};
use tch::Tensor;

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.reshape(-1)).unwrap()
}

fn ints(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.reshape(-1)).unwrap()
}

fn same(a: &Batch, b: &Batch) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs.iter().zip(&b.inputs).all(|(x, y)| x.size() == y.size() && x.kind() == y.kind() && x.equal(y))
        && a.labels.equal(&b.labels)
}

#[test]
fn epoch_order_is_a_deterministic_permutation() {
    let order = epoch_order(1000, 7, 0, true);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_ne!(order, sorted, "shuffled");
    assert_eq!(order, epoch_order(1000, 7, 0, true));
    assert_ne!(order, epoch_order(1000, 7, 1, true), "epochs differ");
    assert_ne!(order, epoch_order(1000, 8, 0, true), "seeds differ");
    assert_eq!(epoch_order(5, 7, 3, false), vec![0, 1, 2, 3, 4]);
    assert!(epoch_order(0, 7, 0, true).is_empty());
    assert_eq!(epoch_order(1, 7, 0, true), vec![0]);
    assert_eq!(epoch_seed(7, 1), epoch_seed(7, 1));
    assert_ne!(epoch_seed(7, 1), epoch_seed(7, 2));
    assert_ne!(epoch_seed(7, 1), epoch_seed(8, 1));
}

#[test]
fn shards_partition_each_global_batch() {
    let order = epoch_order(103, 1, 2, true);
    for world in 1..=4 {
        for drop_last in [false, true] {
            let shards: Vec<_> = (0..world).map(|r| shard_batches(&order, 10, r, world, drop_last)).collect();
            let steps = if drop_last { 10 } else { 11 };
            for (step, chunk) in order.chunks(10).take(steps).enumerate() {
                let parts: Vec<&[usize]> = shards.iter().map(|s| s[step].as_slice()).collect();
                assert_eq!(parts.concat(), chunk, "world {world} step {step}");
                let (min, max) = (parts.iter().map(|p| p.len()).min(), parts.iter().map(|p| p.len()).max());
                assert!(max.unwrap() - min.unwrap() <= 1);
            }
            assert!(shards.iter().all(|s| s.len() == steps));
        }
    }
    let plain: Vec<Vec<usize>> = order.chunks(10).map(<[usize]>::to_vec).collect();
    assert_eq!(shard_batches(&order, 10, 0, 1, false), plain);
    // A last global batch of 3 over 4 ranks: every rank still takes the step, one with no examples.
    assert_eq!(shard_batches(&order, 10, 3, 4, false)[10], Vec::<usize>::new());
    assert_eq!(shard_batches(&order, 10, 0, 4, false)[10], order[100..101].to_vec());
    assert!(shard_batches(&order, 10, 4, 4, false).is_empty(), "rank out of range");
    assert!(shard_batches(&order, 0, 0, 1, false).is_empty());
}

/// Writes IDX files of `labels.len()` images of `rows × cols`.
fn write_idx(dir: &Path, prefix: &str, pixels: &[u8], labels: &[u8], rows: u32, gz: bool) -> Result<()> {
    let mut images = Vec::new();
    for v in [2051, labels.len() as u32, rows, rows] {
        images.extend(v.to_be_bytes());
    }
    images.extend(pixels);
    let mut label_file = Vec::new();
    for v in [2049, labels.len() as u32] {
        label_file.extend(v.to_be_bytes());
    }
    label_file.extend(labels);
    for (name, bytes) in [("images-idx3-ubyte", images), ("labels-idx1-ubyte", label_file)] {
        if gz {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes)?;
            std::fs::write(dir.join(format!("{prefix}-{name}.gz")), enc.finish()?)?;
        } else {
            std::fs::write(dir.join(format!("{prefix}-{name}")), bytes)?;
        }
    }
    Ok(())
}

/// A small IDX dataset of 28×28 pseudo-random images, gzipped.
fn synthetic_mnist(tmp: &TempDir, n: usize) -> Result<FashionMnist> {
    let pixels: Vec<u8> = (0..n * 784).map(|i| ((i * 7919 + i / 784 * 31) % 256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    write_idx(&tmp.0, "t10k", &pixels, &labels, 28, true)?;
    Ok(FashionMnist::load(&tmp.0, Split::Test)?)
}

#[test]
fn loader_is_in_order_and_independent_of_worker_count() -> Result<()> {
    let tmp = TempDir::new("data-loader")?;
    let data: Arc<dyn Dataset> = Arc::new(synthetic_mnist(&tmp, 100)?);
    let steps = shard_batches(&epoch_order(100, 3, 0, true), 16, 0, 1, false);
    let run = |workers| Loader::new(Arc::clone(&data), steps.clone(), Some(42), workers).collect::<Vec<_>>();
    let one = run(1);
    let three = run(3);
    assert_eq!(one.len(), 7);
    for (step, (a, b)) in one.iter().zip(&three).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(same(a, b), "step {step}");
        let direct = data.batch(&steps[step], Some(42))?;
        assert!(same(a, &direct), "step {step} matches a direct batch() call");
        assert_eq!(a.inputs[0].size(), vec![steps[step].len() as i64, 1, 28, 28]);
    }
    Ok(())
}

/// Takes longer for early indices, so workers finish out of order; fails or panics on request.
#[derive(Debug)]
struct Probe {
    fail_at: Option<usize>,
    panic_at: Option<usize>,
    delay: Duration,
}

impl Dataset for Probe {
    fn len(&self) -> usize {
        usize::MAX
    }

    fn classes(&self) -> &[String] {
        &[]
    }

    fn batch(&self, indices: &[usize], _augment: Option<u64>) -> Result<Batch, TrainError> {
        let first = indices[0];
        if Some(first) == self.fail_at {
            return Err(TrainError::Data(format!("probe failure at {first}")));
        }
        assert!(Some(first) != self.panic_at, "probe panic at {first}");
        std::thread::sleep(self.delay / (first as u32 % 4 + 1));
        let labels: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        Ok(Batch { inputs: vec![], labels: Tensor::from_slice(&labels) })
    }
}

#[test]
fn loader_yields_errors_in_place_and_stops_when_dropped() {
    let steps: Vec<Vec<usize>> = (0..12).map(|i| vec![i, i + 100]).collect();
    let probe = Probe { fail_at: Some(5), panic_at: Some(9), delay: Duration::from_millis(8) };
    let results: Vec<_> = Loader::new(Arc::new(probe), steps, None, 3).collect();
    assert_eq!(results.len(), 12);
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(b) => assert_eq!(ints(&b.labels), vec![i as i64, i as i64 + 100]),
            Err(TrainError::Data(m)) if i == 5 => assert!(m.contains("probe failure at 5"), "{m}"),
            Err(TrainError::Data(m)) if i == 9 => assert!(m.contains("panicked") && m.contains("probe panic"), "{m}"),
            Err(e) => panic!("step {i}: unexpected {e}"),
        }
    }

    let probe = Probe { fail_at: None, panic_at: None, delay: Duration::from_millis(20) };
    let steps: Vec<Vec<usize>> = (0..10_000).map(|i| vec![i]).collect();
    let start = Instant::now();
    let mut loader = Loader::new(Arc::new(probe), steps, None, 4);
    assert_eq!(ints(&loader.next().unwrap().unwrap().labels), vec![0]);
    assert_eq!(ints(&loader.next().unwrap().unwrap().labels), vec![1]);
    drop(loader);
    assert!(start.elapsed() < Duration::from_secs(2), "dropping took {:?}", start.elapsed());
}

#[test]
fn idx_augmentation_is_a_flip_and_a_small_shift() -> Result<()> {
    let tmp = TempDir::new("data-idx-aug")?;
    let data = synthetic_mnist(&tmp, 20)?;
    assert_eq!((data.len(), data.image_size()), (20, (28, 28)));
    assert_eq!(data.classes()[9], "Ankle boot");
    let norm = |p: u8| (f32::from(p) - 72.94) / 90.0;
    let indices: Vec<usize> = (0..20).collect();
    let eval = data.batch(&indices, None)?;
    assert_eq!(ints(&eval.labels), (0..20).map(|i| i % 10).collect::<Vec<i64>>());
    let aug = data.batch(&indices, Some(5))?;
    assert!(same(&aug, &data.batch(&indices, Some(5))?), "deterministic per seed");
    assert!(!same(&aug, &data.batch(&indices, Some(6))?), "varies with the seed");
    let (eval, aug) = (floats(&eval.inputs[0]), floats(&aug.inputs[0]));
    for i in 0..20 {
        let (src, label) = data.image(i);
        assert_eq!(label, (i % 10) as i64);
        let plain: Vec<f32> = src.iter().map(|&p| norm(p)).collect();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        assert!(close(&eval[i * 784..(i + 1) * 784], &plain), "eval image {i} is the normalised original");
        let mut matched = false;
        for flip in [false, true] {
            for dy in -2i64..=2 {
                for dx in -2i64..=2 {
                    let candidate: Vec<f32> = (0..784i64)
                        .map(|o| {
                            let (y, x) = (o / 28 - dy, o % 28 - dx);
                            let x = if flip { 27 - x } else { x };
                            if (0..28).contains(&y) && (0..28).contains(&x) {
                                norm(src[(y * 28 + x) as usize])
                            } else {
                                norm(0)
                            }
                        })
                        .collect();
                    matched |= close(&aug[i * 784..(i + 1) * 784], &candidate);
                }
            }
        }
        assert!(matched, "augmented image {i} is a flipped/shifted original");
    }
    let small = data.clone().limit(3);
    assert_eq!(small.len(), 3);
    let sub = data.subset(&[4, 2])?;
    assert_eq!(sub.labels(), &[4, 2]);
    assert!(data.subset(&[20]).is_err());
    assert!(data.batch(&[20], None).is_err());
    // A rank's empty share of a short last global batch.
    let empty = data.batch(&[], Some(1))?;
    assert_eq!((empty.inputs[0].size(), empty.labels.size()), (vec![0, 1, 28, 28], vec![0]));
    Ok(())
}

#[test]
fn corrupt_idx_files_are_errors() -> Result<()> {
    let pixels = vec![1u8; 3 * 784];
    let expect_data_error = |dir: &Path, what: &str| match FashionMnist::load(dir, Split::Train) {
        Err(TrainError::Data(m)) => println!("{what}: {m}"),
        other => panic!("{what}: expected a data error, got {other:?}"),
    };
    let tmp = TempDir::new("data-idx-bad")?;
    expect_data_error(&tmp.0, "missing files");
    write_idx(&tmp.0, "train", &pixels, &[0, 1, 2], 28, false)?;
    assert_eq!(FashionMnist::load(&tmp.0, Split::Train)?.len(), 3, "uncompressed files load");

    let images = tmp.path("train-images-idx3-ubyte");
    std::fs::write(&images, &std::fs::read(&images)?[..1000])?;
    expect_data_error(&tmp.0, "truncated images");
    std::fs::write(&images, [0u8; 10])?;
    expect_data_error(&tmp.0, "truncated header");

    write_idx(&tmp.0, "train", &pixels, &[0, 1, 2], 28, false)?;
    let mut bytes = std::fs::read(&images)?;
    bytes[3] = 0x01;
    std::fs::write(&images, &bytes)?;
    expect_data_error(&tmp.0, "wrong magic");

    write_idx(&tmp.0, "train", &pixels[..2 * 784], &[0, 1], 28, false)?;
    write_idx(&tmp.0, "tmp", &pixels, &[0, 1, 2], 28, false)?;
    std::fs::rename(tmp.path("tmp-labels-idx1-ubyte"), tmp.path("train-labels-idx1-ubyte"))?;
    expect_data_error(&tmp.0, "label count differs from image count");

    write_idx(&tmp.0, "train", &pixels, &[0, 10, 2], 28, false)?;
    expect_data_error(&tmp.0, "label out of range");

    let gz = TempDir::new("data-idx-gz")?;
    write_idx(&gz.0, "train", &pixels, &[0, 1, 2], 28, true)?;
    let images = gz.path("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&images)?;
    std::fs::write(&images, &bytes[..bytes.len() / 2])?;
    expect_data_error(&gz.0, "truncated gzip");
    std::fs::write(&images, b"not gzip at all")?;
    expect_data_error(&gz.0, "not gzip");
    Ok(())
}

#[test]
fn real_fashion_mnist() -> Result<()> {
    let dir = FashionMnist::default_dir();
    if !dir.join("t10k-images-idx3-ubyte.gz").is_file() {
        println!("skipped: {} is absent (apt install dataset-fashion-mnist)", dir.display());
        return Ok(());
    }
    let test = FashionMnist::load(&dir, Split::Test)?;
    assert_eq!(test.len(), 10_000);
    let mut counts = [0usize; 10];
    test.labels().iter().for_each(|&l| counts[usize::from(l)] += 1);
    assert_eq!(counts, [1000; 10]);
    assert_eq!(test.classes().len(), 10);
    assert_eq!(test.normalize(), &Normalize { mean: vec![72.94], std: vec![90.0] });
    let all: Vec<usize> = (0..test.len()).collect();
    let batch = test.batch(&all, None)?;
    assert_eq!(batch.inputs[0].size(), vec![10_000, 1, 28, 28]);
    // The normalisation constants are the data's statistics: mean ≈ 0, std ≈ 1 (test split differs a little).
    let (mean, std) =
        (batch.inputs[0].mean(tch::Kind::Double).double_value(&[]), batch.inputs[0].std(true).double_value(&[]));
    assert!(mean.abs() < 0.02 && (std - 1.0).abs() < 0.02, "mean {mean}, std {std}");
    let (pixels, label) = test.image(0);
    assert_eq!((pixels.len(), label), (784, 9), "the first test image is an ankle boot");
    let first = floats(&batch.inputs[0].get(0));
    assert!((first[400] - (f32::from(pixels[400]) - 72.94) / 90.0).abs() < 1e-6);

    let train = FashionMnist::load(&dir, Split::Train)?;
    assert_eq!(train.len(), 60_000);
    assert!(train.labels().iter().all(|&l| l < 10));
    Ok(())
}

fn write_image(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Result<()> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let format = if path.extension().unwrap().eq_ignore_ascii_case("png") {
        image::ImageFormat::Png
    } else {
        image::ImageFormat::Jpeg
    };
    img.save_with_format(path, format)?;
    Ok(())
}

#[test]
fn image_folder() -> Result<()> {
    let tmp = TempDir::new("data-folder")?;
    for class in ["dog", "cat", "bird"] {
        std::fs::create_dir(tmp.path(class))?;
    }
    write_image(&tmp.path("dog/a.png"), 40, 30, |x, y| [(x * 6) as u8, (y * 8) as u8, 50])?;
    write_image(&tmp.path("dog/b.JPG"), 30, 50, |x, y| [(x * 8) as u8, 100, (y * 5) as u8])?;
    write_image(&tmp.path("cat/c.jpeg"), 64, 48, |x, y| [((x + y) * 2) as u8, 0, 200])?;
    write_image(&tmp.path("bird/solid.PNG"), 20, 20, |_, _| [10, 120, 250])?;
    std::fs::write(tmp.path("cat/notes.txt"), "not an image")?;
    std::fs::write(tmp.path("cat/._c.jpeg"), "macOS metadata")?;
    std::fs::write(tmp.path("stray.png"), "outside any class")?;

    let options = FolderOptions { image_size: 16, ..FolderOptions::default() };
    let data = ImageFolder::open(&tmp.0, options.clone())?;
    assert_eq!(data.classes(), &["bird", "cat", "dog"]);
    assert_eq!(data.len(), 4);
    let names: Vec<String> =
        data.files().iter().map(|(p, c)| format!("{}:{c}", p.file_name().unwrap().to_string_lossy())).collect();
    assert_eq!(names, ["solid.PNG:0", "c.jpeg:1", "a.png:2", "b.JPG:2"]);

    let all = [0, 1, 2, 3];
    let eval = data.batch(&all, None)?;
    assert_eq!(eval.inputs[0].size(), vec![4, 3, 16, 16]);
    assert_eq!(eval.inputs[0].kind(), tch::Kind::Float);
    assert_eq!(ints(&eval.labels), vec![0, 1, 2, 2]);
    assert!(same(&eval, &data.batch(&all, None)?), "evaluation is deterministic");
    let solid = floats(&eval.inputs[0].get(0));
    let imagenet = Normalize::imagenet();
    for (c, value) in [10.0f32, 120.0, 250.0].into_iter().enumerate() {
        let want = (value - imagenet.mean[c]) / imagenet.std[c];
        assert!(solid[c * 256..(c + 1) * 256].iter().all(|v| (v - want).abs() < 1e-5), "channel {c}");
    }

    let aug = data.batch(&all, Some(1))?;
    assert_eq!(aug.inputs[0].size(), vec![4, 3, 16, 16]);
    assert!(same(&aug, &data.batch(&all, Some(1))?), "augmentation is deterministic per seed");
    assert!(!same(&aug, &data.batch(&all, Some(2))?), "and varies across seeds");
    assert!(!same(&aug, &eval));
    // Per example, not per batch: an index gets the same augmentation in any batch.
    let alone = data.batch(&[2], Some(1))?;
    assert!(alone.inputs[0].get(0).equal(&aug.inputs[0].get(2)));

    std::fs::write(tmp.path("cat/broken.jpg"), b"\xff\xd8\xff\xe0 definitely not a jpeg")?;
    let mut png = Vec::new();
    image::RgbImage::from_pixel(30, 30, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    std::fs::write(tmp.path("cat/cut.png"), &png[..png.len() / 2])?;
    let data = ImageFolder::open(&tmp.0, options)?;
    for (i, name) in [(1, "broken.jpg"), (3, "cut.png")] {
        assert!(data.files()[i].0.ends_with(name));
        match data.batch(&[0, i], None) {
            Err(TrainError::Data(m)) => assert!(m.contains(name), "{m}"),
            other => panic!("{name}: expected a data error, got {other:?}"),
        }
    }
    assert!(ImageFolder::open(&tmp.path("dog"), FolderOptions::default()).is_err(), "no class folders");
    Ok(())
}

fn tokenizer_path() -> Option<std::path::PathBuf> {
    let path = kiln_tests::workspace_root().join(".kiln/assets/minilm-l6/tokenizer.json");
    if path.is_file() {
        Some(path)
    } else {
        println!("skipped: {} is missing (make setup)", path.display());
        None
    }
}

#[test]
fn text_classification_csv_and_tsv() -> Result<()> {
    let Some(tokenizer) = tokenizer_path() else { return Ok(()) };
    let tmp = TempDir::new("data-text")?;
    let csv = "text,label\r\n\"Hello, world\",pos\r\n\"She said \"\"hi\"\"\",neg\n\nshort,pos\n\"two\nlines\",neu\n";
    std::fs::write(tmp.path("train.csv"), csv)?;
    let options = TextOptions { max_len: 32, has_header: true, ..TextOptions::default() };
    let data = TextClassification::load(&tmp.path("train.csv"), &tokenizer, options.clone())?;
    assert_eq!(data.len(), 4);
    assert_eq!(data.classes(), &["neg", "neu", "pos"]);
    assert_eq!(data.labels(), &[2, 0, 2, 1]);

    let mut reference = tokenizers::Tokenizer::from_file(&tokenizer).unwrap();
    reference.with_padding(None);
    let texts = ["Hello, world", "She said \"hi\"", "short", "two\nlines"];
    for (i, text) in texts.iter().enumerate() {
        let want = reference.encode(*text, true).unwrap();
        assert_eq!(data.example(i).0, want.get_ids(), "{text:?} was read as written");
    }

    let batch = data.batch(&[2, 1], None)?;
    assert_eq!(batch.inputs.len(), 3);
    let longest = data.example(1).0.len();
    for t in &batch.inputs {
        assert_eq!((t.size(), t.kind()), (vec![2, longest as i64], tch::Kind::Int64));
    }
    let (ids, mask, types) = (ints(&batch.inputs[0]), ints(&batch.inputs[1]), ints(&batch.inputs[2]));
    let short = data.example(2).0.len();
    for (row, len) in [(0, short), (1, longest)] {
        let r = &ids[row * longest..(row + 1) * longest];
        assert_eq!((r[0], r[len - 1]), (101, 102), "[CLS] … [SEP]");
        assert!(r[len..].iter().all(|&p| p == 0), "padded with [PAD] = 0");
        let m = &mask[row * longest..(row + 1) * longest];
        assert!(m[..len].iter().all(|&v| v == 1) && m[len..].iter().all(|&v| v == 0));
    }
    assert!(types.iter().all(|&t| t == 0));
    assert_eq!(ints(&batch.labels), vec![2, 0]);
    assert_eq!(data.pad_id(), 0);

    // TSV, integer labels, label first, truncation.
    let long = "word ".repeat(100);
    let tsv = format!("1\t\"a, b \"\"quoted\"\"\"\n0\tplain\n3\t{long}\n");
    std::fs::write(tmp.path("train.tsv"), tsv)?;
    let options = TextOptions { max_len: 8, label_column: 0, text_column: 1, ..TextOptions::default() };
    let data = TextClassification::load(&tmp.path("train.tsv"), &tokenizer, options)?;
    assert_eq!(data.classes(), &["0", "1", "2", "3"]);
    assert_eq!(data.labels(), &[1, 0, 3]);
    let want = reference.encode("a, b \"quoted\"", true).unwrap();
    assert_eq!(data.example(0).0, &want.get_ids()[..want.get_ids().len().min(8)]);
    let truncated = data.example(2).0;
    assert_eq!((truncated.len(), truncated[0], truncated[7]), (8, 101, 102));
    assert_eq!(data.batch(&[0, 1, 2], None)?.inputs[0].size(), vec![3, 8]);
    Ok(())
}

#[test]
fn bad_text_inputs_are_errors() -> Result<()> {
    let tmp = TempDir::new("data-text-bad")?;
    std::fs::write(tmp.path("bogus.json"), "{ not a tokenizer")?;
    std::fs::write(tmp.path("ok.csv"), "hello,pos\n")?;
    let load = |file: &str, tok: &Path| TextClassification::load(&tmp.path(file), tok, TextOptions::default());
    assert!(matches!(load("ok.csv", &tmp.path("bogus.json")), Err(TrainError::Tokenizer(_))));
    let Some(tokenizer) = tokenizer_path() else { return Ok(()) };
    for (name, content) in [
        ("open.csv", "\"never closed,pos\n"),
        ("junk.csv", "\"closed\"junk,pos\n"),
        ("short.csv", "text only\n"),
        ("empty.csv", "\n\n"),
    ] {
        std::fs::write(tmp.path(name), content)?;
        match load(name, &tokenizer) {
            Err(TrainError::Data(m)) => println!("{name}: {m}"),
            other => panic!("{name}: expected a data error, got {other:?}"),
        }
    }
    std::fs::write(tmp.path("data.txt"), "hello,pos\n")?;
    assert!(matches!(load("data.txt", &tokenizer), Err(TrainError::Config(_))), "unknown delimiter");
    Ok(())
}
