//! Codec micro-benchmarks: encoding and decoding frames of typical sizes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redline_proto::DocId;
use redline_proto::codec::{DEFAULT_MAX_FRAME, FrameDecoder, encode_frame};
use redline_proto::message::{Message, Push};

fn push(len: usize) -> Message {
    Message::Push(Push {
        doc: DocId::parse("ledger/team-3/2026-11-29").unwrap(),
        bundle: vec![0x5a; len],
        heads: vec![[7; 32], [9; 32]],
    })
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for len in [64usize, 4 * 1024, 256 * 1024] {
        let msg = push(len);
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap();
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode", len), &msg, |b, m| {
            b.iter(|| encode_frame(std::hint::black_box(m), DEFAULT_MAX_FRAME).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("decode", len), &frame, |b, f| {
            b.iter(|| {
                let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
                d.push(std::hint::black_box(f));
                d.next_message().unwrap().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
