use std::time::Instant;
use tern_queue::*;
fn env(id: MessageId) -> Envelope {
    Envelope { id, queue_id: id, sender: "s@example.com".into(), destination: "example.org".into(),
        recipients: vec![Recipient::new("r@example.org".into())], env_id: None, ret: None,
        body_type: BodyType::SevenBit, smtputf8: false, size: 0, created_ms: 0, expires_ms: 0,
        next_due_ms: id.created_ms(), attempts: 0,
        source: Source { client_ip: "1".into(), helo: "h".into(), auth_user: None, protocol: "ESMTP".into() }, held: false }
}
fn main() {
    if std::env::args().nth(1).as_deref() == Some("raw") {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).flush_every_ms(None).open().unwrap();
        let body = vec![b'x'; 5120];
        let t = Instant::now();
        for i in 0..8000u64 { let mut b = sled::Batch::default(); b.insert(&i.to_be_bytes()[..], body.clone()); b.insert(&(i|1<<63).to_be_bytes()[..], vec![b'y'; 400]); db.apply_batch(b).unwrap(); }
        eprintln!("apply 8000: {:?}", t.elapsed());
        let t = Instant::now(); db.flush().unwrap(); eprintln!("flush: {:?}", t.elapsed());
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.path().join("db")).unwrap();
        let t = Instant::now(); f.sync_data().unwrap(); eprintln!("fdatasync: {:?}", t.elapsed());
        let t = Instant::now(); for _ in 0..100 { f.sync_data().unwrap(); } eprintln!("empty fdatasync x100: {:?}", t.elapsed());
        return;
    }
    let writers: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let iters: usize = std::env::args().nth(2).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let body = vec![b'x'; 5120];
    let t = Instant::now();
    rt.block_on(async {
        for _ in 0..iters {
            let tasks: Vec<_> = (0..writers).map(|_| { let s = spool.clone(); let b = body.clone();
                tokio::spawn(async move { let id = s.next_id(); s.commit(vec![(env(id), b)]).await.unwrap() }) }).collect();
            for t in tasks { t.await.unwrap(); }
        }
    });
    let el = t.elapsed();
    let n = writers * iters;
    eprintln!("{n} commits in {el:?}: {:.0}/s; {:?}; blobs={}", n as f64 / el.as_secs_f64(), spool.commit_stats(),
        std::fs::read_dir(dir.path().join("blobs")).unwrap().count());
}
#[allow(dead_code)]
fn raw() {}
