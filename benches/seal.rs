//! Sealed-batch AEADs side by side (decision 0029): ChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`, what `snow` uses) and AES-256-GCM (`ring`, BoringSSL's assembly with
//! AES-NI, VAES and PCLMULQDQ where the CPU has them), sealing and opening in place a batch
//! of the sizes the agent sends (a 256 KiB batch, a 9000-byte packet, a 64-byte ping).
//!
//! Run: `cargo bench --bench seal`. Throughput counts the sealed bytes.

use std::hint::black_box;
use std::time::Duration;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 3] = [64, 9000, 256 * 1024];
const AAD: &[u8] = b"TE\x02\x01\0\0\0\x2a\0\0\0\0\0\0\0\x09tunbus.v1.198-18-0-2.3";

fn aeads(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    g.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let chacha = chacha20poly1305::ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&[7; 32]));
    let aes = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7; 32]).expect("a 32-byte key"));
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0x5a; size];
        g.bench_with_input(BenchmarkId::new("chacha20poly1305", size), &size, |b, _| {
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_le_bytes());
                black_box(chacha.encrypt_in_place_detached(chacha20poly1305::Nonce::from_slice(&nonce), AAD, &mut buf).expect("seals"))
            })
        });
        g.bench_with_input(BenchmarkId::new("aes256gcm", size), &size, |b, _| {
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_le_bytes());
                let nonce = ring::aead::Nonce::assume_unique_for_key(nonce);
                black_box(aes.seal_in_place_separate_tag(nonce, ring::aead::Aad::from(AAD), &mut buf).expect("seals"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, aeads);
criterion_main!(benches);
