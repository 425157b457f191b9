//! Training text, tokenizer and deterministic batching.
//!
//! * Text: [`synthetic_text`] generates, from a seed and to any length, simple English-like lines
//!   from a small grammar (subject-verb-object sentences, counting, one-digit additions,
//!   possessions, repetitions, letter runs): nothing to download, and structure a small model
//!   learns visibly (the loss falls well below the ~2.5 nats/byte of a unigram model). Any UTF-8
//!   file works too ([`Corpus::from_file`]).
//! * Tokens: bytes ([`ByteTokenizer`], vocabulary [`BYTE_VOCAB`] = 256). Byte-level needs no
//!   vocabulary file and covers any UTF-8 text; on the ASCII synthetic corpus it is char-level.
//! * Batches: [`Batcher`] draws the start of each of the `global_batch` windows of `ctx + 1`
//!   tokens uniformly from a generator seeded by `(seed, step)`, so a batch depends only on the
//!   corpus, the seed and the step number (random access, no iterator state to checkpoint).
//!   [`Batcher::shard`] gives worker `w` of `W` the *contiguous block* of rows
//!   `w * B / W .. (w + 1) * B / W`: the shards of all workers, concatenated in rank order, are
//!   exactly the global batch a single worker gets, whatever `W` is.

use crate::dense::BatchShape;
use crate::error::{Result, RuntimeError};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::Arc;

/// Vocabulary of the byte tokenizer.
pub const BYTE_VOCAB: usize = 256;

/// Byte-level tokenizer: token `i` is byte `i`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// The UTF-8 bytes of `text` as token ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Text from token ids; invalid UTF-8 and ids above 255 become U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(tokens.len());
        for &t in tokens {
            match u8::try_from(t) {
                Ok(b) => bytes.push(b),
                Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A tokenized training text, shared cheaply between workers (`Arc`).
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    tokens: Arc<[u32]>,
}

impl Corpus {
    /// Tokens of `text` (byte-level).
    pub fn from_text(text: &str) -> Self {
        Self { tokens: ByteTokenizer.encode(text).into() }
    }

    /// [`synthetic_text`] of `len_bytes` bytes from `seed`, tokenized.
    pub fn synthetic(seed: u64, len_bytes: usize) -> Self {
        Self::from_text(&synthetic_text(seed, len_bytes))
    }

    /// Reads a UTF-8 text file; an error naming the path when it cannot be read, is not UTF-8, or
    /// holds fewer than `ctx + 1` tokens (one training window).
    pub fn from_file(path: &Path, ctx: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io { path: path.to_path_buf(), source })?;
        let text = String::from_utf8(bytes).map_err(|e| RuntimeError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8 text (invalid byte sequence at byte {})", e.utf8_error().valid_up_to()),
            ),
        })?;
        let corpus = Self::from_text(&text);
        if corpus.len() < ctx + 1 {
            return Err(RuntimeError::invalid(
                format!("corpus {}", path.display()),
                format!(
                    "{} tokens (bytes) is shorter than one training window of ctx + 1 = {}; use a longer text or a smaller context",
                    corpus.len(),
                    ctx + 1
                ),
            ));
        }
        Ok(corpus)
    }

    /// The token ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Splits into `(train, validation)`: the last `validation_fraction` of the tokens (rounded
    /// down) are the validation part. An error unless the fraction is in `[0, 1)`.
    pub fn split(&self, validation_fraction: f64) -> Result<(Corpus, Corpus)> {
        if !(0.0..1.0).contains(&validation_fraction) {
            return Err(RuntimeError::invalid(
                "validation fraction",
                format!("{validation_fraction} must be in [0, 1)"),
            ));
        }
        let cut = self.len() - (self.len() as f64 * validation_fraction) as usize;
        Ok((Corpus { tokens: self.tokens[..cut].into() }, Corpus { tokens: self.tokens[cut..].into() }))
    }
}

const NAMES: &[&str] = &["alice", "bob", "carol", "dave", "eve", "frank"];
const NOUNS: &[&str] = &["cat", "dog", "bird", "fish", "fox", "cow", "frog", "bee"];
const ADJECTIVES: &[&str] = &["red", "big", "small", "old", "happy", "quick", "lazy", "green"];
const VERBS: &[&str] = &["sees", "likes", "chases", "finds", "helps", "follows"];
const NUMBER_WORDS: &[&str] =
    &["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"];

fn pick<'a>(rng: &mut ChaCha8Rng, words: &[&'a str]) -> &'a str {
    words[rng.random_range(0..words.len() as u32) as usize]
}

/// One line of the grammar (ends with `".\n"`).
fn sentence(rng: &mut ChaCha8Rng, out: &mut String) {
    use std::fmt::Write;
    match rng.random_range(0..6u32) {
        0 => {
            // the [adj] noun verb the [adj] noun.
            let subject = pick(rng, NOUNS);
            let adj = pick(rng, ADJECTIVES);
            let (verb, object) = (pick(rng, VERBS), pick(rng, NOUNS));
            if rng.random_range(0..2u32) == 0 {
                let _ = writeln!(out, "the {adj} {subject} {verb} the {object}.");
            } else {
                let _ = writeln!(out, "the {subject} {verb} the {adj} {object}.");
            }
        }
        1 => {
            // counting in words: "one two three four."
            let start = rng.random_range(0..(NUMBER_WORDS.len() as u32 - 4)) as usize;
            let run = rng.random_range(3..5u32) as usize;
            let _ = writeln!(out, "{}.", NUMBER_WORDS[start..start + run].join(" "));
        }
        2 => {
            // one-digit addition: "3 plus 4 is 7."
            let (a, b) = (rng.random_range(0..10u32), rng.random_range(0..10u32));
            let _ = writeln!(out, "{a} plus {b} is {}.", a + b);
        }
        3 => {
            // possession with agreement: "bob has one cat." / "bob has 3 cats."
            let (name, noun) = (pick(rng, NAMES), pick(rng, NOUNS));
            match rng.random_range(1..6u32) {
                1 => {
                    let _ = writeln!(out, "{name} has one {noun}.");
                }
                n => {
                    let _ = writeln!(out, "{name} has {} {noun}s.", NUMBER_WORDS[n as usize]);
                }
            }
        }
        4 => {
            // repetition: "fox fox fox."
            let w = pick(rng, NOUNS);
            let _ = writeln!(out, "{w} {w} {w}.");
        }
        _ => {
            // letter run: "c d e f."
            let start = rng.random_range(0..20u32) as u8;
            let run = rng.random_range(3..7u8);
            let letters: Vec<String> = (0..run).map(|i| ((b'a' + start + i) as char).to_string()).collect();
            let _ = writeln!(out, "{}.", letters.join(" "));
        }
    }
}

/// `len_bytes` bytes of ASCII text from the grammar, deterministic from `seed` (ChaCha8): the
/// same seed gives the same text on every machine, and a longer text starts with a shorter one.
pub fn synthetic_text(seed: u64, len_bytes: usize) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = String::with_capacity(len_bytes + 64);
    while out.len() < len_bytes {
        sentence(&mut rng, &mut out);
    }
    out.truncate(len_bytes); // ASCII: any byte boundary is a char boundary
    out
}

/// A batch of training windows: `inputs[r, s]` is token `s` of window `r` and `targets[r, s]` is
/// token `s + 1` (the window of `seq + 1` tokens split into inputs and next-token targets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[rows, seq]`.
    pub shape: BatchShape,
    /// `[rows, seq]` input ids.
    pub inputs: Vec<u32>,
    /// `[rows, seq]` next-token ids.
    pub targets: Vec<u32>,
}

/// Deterministic random windows from a corpus; see the [module docs](self) for the sharding rule.
#[derive(Debug, Clone)]
pub struct Batcher {
    tokens: Arc<[u32]>,
    ctx: usize,
    global_batch: usize,
    seed: u64,
}

/// SplitMix64 finaliser: decorrelates `(seed, step)` into one generator seed.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Batcher {
    /// Windows of `ctx + 1` tokens, `global_batch` per step. An error when `ctx` or
    /// `global_batch` is 0 or the corpus is shorter than one window.
    pub fn new(corpus: &Corpus, ctx: usize, global_batch: usize, seed: u64) -> Result<Self> {
        if ctx == 0 || global_batch == 0 {
            return Err(RuntimeError::invalid(
                "batcher",
                format!("ctx ({ctx}) and global batch ({global_batch}) must be at least 1"),
            ));
        }
        if corpus.len() < ctx + 1 {
            return Err(RuntimeError::invalid(
                "corpus",
                format!("{} tokens is shorter than one window of ctx + 1 = {}", corpus.len(), ctx + 1),
            ));
        }
        Ok(Self { tokens: corpus.tokens.clone(), ctx, global_batch, seed })
    }

    /// Tokens per window minus one (the sequence length of a batch).
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Windows per step over all workers.
    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// The first token of each of the `global_batch` windows of `step`.
    pub fn starts(&self, step: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed ^ mix(step)));
        let max_start = (self.tokens.len() - self.ctx - 1) as u64;
        (0..self.global_batch).map(|_| rng.random_range(0..=max_start) as usize).collect()
    }

    /// The whole batch of `step` (what one worker trains on when it is alone).
    pub fn batch(&self, step: u64) -> Batch {
        self.rows(&self.starts(step))
    }

    /// Worker `worker`'s part of the batch of `step` when `workers` share it: the contiguous rows
    /// `worker * B / W .. (worker + 1) * B / W`. An error unless `workers` divides the global batch
    /// and `worker < workers`.
    pub fn shard(&self, step: u64, worker: usize, workers: usize) -> Result<Batch> {
        if workers == 0 || worker >= workers || !self.global_batch.is_multiple_of(workers) {
            return Err(RuntimeError::invalid(
                "batch shard",
                format!(
                    "worker {worker} of {workers}: need worker < workers and workers dividing the global batch {}",
                    self.global_batch
                ),
            ));
        }
        let per = self.global_batch / workers;
        Ok(self.rows(&self.starts(step)[worker * per..(worker + 1) * per]))
    }

    fn rows(&self, starts: &[usize]) -> Batch {
        let seq = self.ctx;
        let mut inputs = Vec::with_capacity(starts.len() * seq);
        let mut targets = Vec::with_capacity(starts.len() * seq);
        for &s in starts {
            inputs.extend_from_slice(&self.tokens[s..s + seq]);
            targets.extend_from_slice(&self.tokens[s + 1..s + seq + 1]);
        }
        Batch { shape: BatchShape { batch: starts.len(), seq }, inputs, targets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_text_is_deterministic_ascii_of_any_length() {
        let a = synthetic_text(1, 5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a, synthetic_text(1, 5000));
        assert_ne!(a, synthetic_text(2, 5000));
        assert!(a.is_ascii());
        assert!(synthetic_text(1, 7000).starts_with(&a));
        assert_eq!(synthetic_text(3, 0), "");
        // Every kind of line appears.
        for needle in [" plus ", " has ", "the ", "four", "a b c"] {
            assert!(synthetic_text(4, 20_000).contains(needle), "{needle}");
        }
        let t = synthetic_text(5, 20_000);
        for line in t.lines().take(t.lines().count() - 1) {
            if let Some(rest) = line.split(" plus ").nth(1) {
                let a: u32 = line.split(' ').next().unwrap().parse().unwrap();
                let mut parts = rest.trim_end_matches('.').split(" is ");
                let (b, c): (u32, u32) =
                    (parts.next().unwrap().parse().unwrap(), parts.next().unwrap().parse().unwrap());
                assert_eq!(a + b, c, "{line}");
            }
        }
    }

    #[test]
    fn tokenizer_round_trips() {
        let text = "héllo, wörld\n";
        let ids = ByteTokenizer.encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&t| (t as usize) < BYTE_VOCAB));
        assert_eq!(ByteTokenizer.decode(&ids), text);
        assert_eq!(ByteTokenizer.decode(&[104, 300, 105]), "h\u{FFFD}i");
    }

    #[test]
    fn shards_concatenate_to_the_global_batch() {
        let corpus = Corpus::synthetic(7, 10_000);
        let b = Batcher::new(&corpus, 16, 12, 99).unwrap();
        for step in [0u64, 1, 1000] {
            let global = b.batch(step);
            assert_eq!(global.shape, BatchShape { batch: 12, seq: 16 });
            assert_eq!(global.inputs.len(), 12 * 16);
            for workers in [1, 2, 3, 4, 6, 12] {
                let mut inputs = Vec::new();
                let mut targets = Vec::new();
                for w in 0..workers {
                    let s = b.shard(step, w, workers).unwrap();
                    assert_eq!(s.shape.batch, 12 / workers);
                    inputs.extend(s.inputs);
                    targets.extend(s.targets);
                }
                assert_eq!(inputs, global.inputs);
                assert_eq!(targets, global.targets);
            }
        }
        assert_ne!(b.batch(0), b.batch(1));
        assert_eq!(b.batch(5), Batcher::new(&corpus, 16, 12, 99).unwrap().batch(5));
        assert_ne!(b.batch(5), Batcher::new(&corpus, 16, 12, 98).unwrap().batch(5));
        // Targets are the inputs shifted by one inside each window.
        let g = b.batch(3);
        let starts = b.starts(3);
        for (r, &s) in starts.iter().enumerate() {
            assert_eq!(&g.inputs[r * 16..(r + 1) * 16], &corpus.tokens()[s..s + 16]);
            assert_eq!(&g.targets[r * 16..(r + 1) * 16], &corpus.tokens()[s + 1..s + 17]);
        }
        assert!(b.shard(0, 0, 5).is_err());
        assert!(b.shard(0, 4, 4).is_err());
        assert!(b.shard(0, 0, 0).is_err());
    }

    #[test]
    fn windows_reach_the_end_of_a_short_corpus() {
        let corpus = Corpus::from_text("abcdef");
        let b = Batcher::new(&corpus, 5, 4, 0).unwrap();
        let g = b.batch(0);
        assert_eq!(g.inputs, [97, 98, 99, 100, 101].repeat(4));
        assert!(Batcher::new(&corpus, 6, 1, 0).is_err());
        assert!(Batcher::new(&corpus, 0, 1, 0).is_err());
        assert!(Batcher::new(&corpus, 2, 0, 0).is_err());
    }

    #[test]
    fn from_file_reports_the_path() {
        let dir = std::env::temp_dir().join(format!("switchyard-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.txt");
        let err = Corpus::from_file(&missing, 4).unwrap_err();
        assert!(err.to_string().contains("missing.txt"), "{err}");

        let binary = dir.join("binary.txt");
        std::fs::write(&binary, [b'a', b'b', 0xFF, 0xFE, b'c']).unwrap();
        let err = Corpus::from_file(&binary, 2).unwrap_err();
        assert!(err.to_string().contains("binary.txt") && err.to_string().contains("byte 2"), "{err}");

        let short = dir.join("short.txt");
        std::fs::write(&short, "abc").unwrap();
        let err = Corpus::from_file(&short, 3).unwrap_err();
        assert!(err.to_string().contains("short.txt"), "{err}");
        assert_eq!(Corpus::from_file(&short, 2).unwrap().tokens(), &[97, 98, 99]);

        let (train, val) = Corpus::from_text("abcdefghij").split(0.2).unwrap();
        assert_eq!((train.len(), val.len()), (8, 2));
        assert!(Corpus::from_text("ab").split(1.0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
