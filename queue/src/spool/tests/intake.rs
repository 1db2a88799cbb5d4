//! The intake journal seen through the spool: commits while sled opens, crashes before and
//! during the move, torn and damaged journals.

use super::*;
use std::path::PathBuf;
use std::time::Duration;

/// A spool whose sled opens only after `delay` (the test-only hook), taking commits into
/// the journal meanwhile.
fn deferred(delay: Duration) -> SpoolOptions {
    SpoolOptions {
        defer_open: true,
        open_delay_for_tests: Some(delay),
        ..SpoolOptions::default()
    }
}

fn journals(dir: &Path) -> Vec<PathBuf> {
    journal::list(&journal::dir(dir))
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Commits `n` messages one by one (one journal frame each while sled is not open).
async fn commit_each(spool: &Spool, n: usize) -> Vec<(MessageId, Vec<u8>)> {
    let mut made = Vec::new();
    for i in 0..n {
        let id = spool.next_id();
        let body = body_for(id, 100 + i * 37);
        spool
            .commit(vec![(envelope(id, id, "example.org", 5_000), body.clone())])
            .await
            .unwrap();
        made.push((id, body));
    }
    made
}

/// Leaves `n` acknowledged commits in a journal, as a process killed before sled opened
/// would: the spool is forgotten with its sled never opened (so no lock is held), and
/// its threads wait for an open that never comes.
async fn crash_during_intake(dir: &Path, n: usize) -> Vec<(MessageId, Vec<u8>)> {
    let spool = Spool::open_with(dir, &deferred(Duration::from_secs(24 * 3600))).unwrap();
    let made = commit_each(&spool, n).await;
    assert!(!spool.is_open());
    std::mem::forget(spool);
    made
}

/// The open named exactly `made` as earlier runs' intake (`Spool::earlier_intake`).
fn assert_names_earlier(spool: &Spool, made: &[(MessageId, Vec<u8>)]) {
    let mut named = spool.earlier_intake();
    named.sort();
    let mut want: Vec<MessageId> = made.iter().map(|(id, _)| *id).collect();
    want.sort();
    assert_eq!(named, want);
}

fn assert_holds_exactly(spool: &Spool, made: &[(MessageId, Vec<u8>)]) {
    let ids: Vec<MessageId> = spool.list().unwrap().iter().map(|e| e.id).collect();
    let mut want: Vec<MessageId> = made.iter().map(|(id, _)| *id).collect();
    want.sort();
    assert_eq!(ids, want, "each message exactly once");
    for (id, body) in made {
        assert_eq!(&spool.body(*id).unwrap().unwrap()[..], &body[..]);
    }
    assert_eq!(
        spool.due_before(u64::MAX, 1000).unwrap().len(),
        made.len(),
        "one due key each"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_while_sled_opens_are_durable_in_the_journal_and_moved_once() {
    let dir = tempfile::tempdir().unwrap();
    // An existing spool with mail in it, closed cleanly.
    let old = {
        let spool = Spool::open(dir.path()).unwrap();
        commit_each(&spool, 2).await
    };
    let spool = Spool::open_with(dir.path(), &deferred(Duration::from_millis(700))).unwrap();
    assert!(!spool.is_open());
    assert!(matches!(spool.recovery(), RecoveryStatus::Running { .. }));
    let new = commit_each(&spool, 3).await;
    // Acknowledged before sled was open: from the journal, one frame per round.
    assert!(!spool.is_open(), "the open was not delayed");
    let files = journals(dir.path());
    assert_eq!(files.len(), 1);
    let mut frames = 0;
    let end = journal::read(&files[0], |_, _| {
        frames += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((frames, end), (3, journal::End::Clean));
    assert_eq!(spool.stats().messages, 3, "what was committed since open");
    // Other writes wait for sled (and the move) rather than going to the journal.
    let updated = {
        let spool = spool.clone();
        let mut env = spool_envelope_for(&new[0].0);
        env.next_due_ms = 9_000;
        tokio::spawn(async move {
            spool.update(&env).await.unwrap();
            spool.is_open()
        })
    };
    spool.ready().await.unwrap();
    assert!(
        updated.await.unwrap(),
        "the update ran before sled was open"
    );
    assert!(
        journals(dir.path()).is_empty(),
        "the journal is gone after the move"
    );
    assert!(
        spool.earlier_intake().is_empty(),
        "this run's own intake is not an earlier run's"
    );
    let all: Vec<_> = old.iter().chain(&new).cloned().collect();
    assert_holds_exactly(&spool, &all);
    assert_eq!(
        spool.envelope(new[0].0).unwrap().unwrap().next_due_ms,
        9_000
    );
    assert_eq!(spool.stats(), truth(&spool));
    // New ids stay above everything, and commits now go to sled.
    let later = commit_each(&spool, 1).await;
    assert!(all.iter().all(|(id, _)| *id < later[0].0));
    assert!(journals(dir.path()).is_empty());
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert!(spool.opened_after_clean_close());
    let all: Vec<_> = all.into_iter().chain(later).collect();
    assert_holds_exactly(&spool, &all);
    assert_eq!(spool.stats(), truth(&spool));
}

/// The stored form of a just committed message, for an update (the test commits
/// `envelope(id, id, "example.org", 5_000)`).
fn spool_envelope_for(id: &MessageId) -> Envelope {
    envelope(*id, *id, "example.org", 5_000)
}

#[tokio::test]
async fn a_crash_after_250_before_the_move_keeps_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let old = {
        let spool = Spool::open(dir.path()).unwrap();
        commit_each(&spool, 2).await
    };
    let new = crash_during_intake(dir.path(), 4).await;
    assert_eq!(journals(dir.path()).len(), 1);
    let spool = Spool::open(dir.path()).unwrap();
    assert!(journals(dir.path()).is_empty());
    // The crashed run's intake is named for its owner to check; the mail from before is not.
    assert_names_earlier(&spool, &new);
    let all: Vec<_> = old.into_iter().chain(new).collect();
    assert_holds_exactly(&spool, &all);
    // After a clean close nothing scans: the move counted the journal's messages.
    assert!(spool.opened_after_clean_close());
    assert_eq!(spool.stats(), truth(&spool));
    drop(spool);
    // Named again by every open until its owner reports it checked.
    let spool = Spool::open(dir.path()).unwrap();
    assert_holds_exactly(&spool, &all);
    assert_names_earlier(&spool, &all[2..]);
    let ids: Vec<MessageId> = all[2..].iter().map(|(id, _)| *id).collect();
    spool.intake_checked(&ids).await.unwrap();
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_holds_exactly(&spool, &all);
    assert!(
        spool.earlier_intake().is_empty(),
        "not named once reported checked"
    );
}

/// The crash gap the marks close: a run moved its own intake into sled (the journal is
/// gone) and ended before its owner checked that mail. The next open names it, and every
/// open after that until the owner reports it checked; mail committed after the move (to
/// sled directly) is never named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_moved_but_never_checked_is_named_at_every_open_until_checked() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_with(dir.path(), &deferred(Duration::from_millis(300))).unwrap();
    let intake = commit_each(&spool, 3).await;
    spool.ready().await.unwrap();
    assert!(journals(dir.path()).is_empty(), "moved");
    assert!(spool.earlier_intake().is_empty(), "its own run's");
    let later = commit_each(&spool, 1).await;
    let all: Vec<_> = intake.iter().chain(&later).cloned().collect();
    // Gone before any check: nothing but the marks says this mail was intake.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_holds_exactly(&spool, &all);
    assert_names_earlier(&spool, &intake);
    // Reported checked one at a time: each report is durable on its own.
    spool.intake_checked(&[intake[0].0]).await.unwrap();
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_names_earlier(&spool, &intake[1..]);
    let rest: Vec<MessageId> = intake[1..].iter().map(|(id, _)| *id).collect();
    spool.intake_checked(&rest).await.unwrap();
    // Its own run's check clears them for good, with the mail untouched.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert!(spool.earlier_intake().is_empty());
    assert_holds_exactly(&spool, &all);
    assert_eq!(spool.stats(), truth(&spool));
}

#[tokio::test]
async fn a_crash_during_the_move_writes_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let old = {
        let spool = Spool::open(dir.path()).unwrap();
        commit_each(&spool, 2).await
    };
    let new = crash_during_intake(dir.path(), 3).await;
    // As if the previous open crashed after moving the first frame only: the clean-close
    // record was taken, frame one is in sled, the journal is still there.
    {
        let db = open_sled(dir.path(), SpoolOptions::default().cache_size).unwrap();
        db.remove(clean_close::KEY).unwrap();
        let path = &journals(dir.path())[0];
        let mut first = true;
        journal::read(path, |_, ops| {
            if std::mem::take(&mut first) {
                let mut batch = sled::Batch::default();
                for (k, v) in ops {
                    batch.insert(k, v.unwrap());
                }
                db.apply_batch(batch).unwrap();
            }
            Ok(())
        })
        .unwrap();
        db.flush().unwrap();
    }
    let spool = Spool::open(dir.path()).unwrap();
    assert!(!spool.opened_after_clean_close());
    // The frame the cut-short move had written is named too: it was never checked either.
    assert_names_earlier(&spool, &new);
    let all: Vec<_> = old.into_iter().chain(new).collect();
    assert_holds_exactly(&spool, &all);
    assert_eq!(
        spool.stats(),
        truth(&spool),
        "counted once, by the scan or the move"
    );
    assert!(journals(dir.path()).is_empty());
    // Marked, the frame the cut-short move wrote included: the next open names all of it.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_names_earlier(&spool, &all[2..]);
}

#[tokio::test]
async fn a_torn_last_frame_is_dropped_and_the_rest_moved() {
    let dir = tempfile::tempdir().unwrap();
    let new = crash_during_intake(dir.path(), 3).await;
    let path = journals(dir.path())[0].clone();
    // Half a round: its write never completed, so it was never acknowledged.
    let frame = journal::encode_frame(&[insert(b"Xtorn", b"never acknowledged".to_vec())]).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&frame[..frame.len() / 2]);
    fs::write(&path, bytes).unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    assert_holds_exactly(&spool, &new);
    assert!(spool.journal_set_aside().is_empty());
    assert!(journals(dir.path()).is_empty());
    assert!(!spool.raw_keys().iter().any(|k| k.starts_with(b"X")));
}

#[tokio::test]
async fn damage_before_the_tail_is_named_and_the_file_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let new = crash_during_intake(dir.path(), 3).await;
    let path = journals(dir.path())[0].clone();
    let mut second = None;
    journal::read(&path, |offset, _| {
        if offset > 0 && second.is_none() {
            second = Some(offset);
        }
        Ok(())
    })
    .unwrap();
    let second = second.unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[second as usize + 20] ^= 0x01;
    fs::write(&path, bytes).unwrap();

    let spool = Spool::open(dir.path()).unwrap();
    // The frame before the damage is moved; the file is kept, renamed, with the offset.
    assert_holds_exactly(&spool, &new[..1]);
    let aside = spool.journal_set_aside();
    assert_eq!(aside.len(), 1);
    assert_eq!(aside[0].1, second);
    assert!(aside[0].0.exists(), "{:?} kept", aside[0].0);
    assert!(aside[0].0.to_string_lossy().ends_with(".journal.damaged"));
    assert!(!path.exists());
    // Kept aside, not replayed: a second open does not look at it again.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert!(spool.journal_set_aside().is_empty());
    assert!(aside[0].0.exists());
}

/// A commit during intake meets the same free-space limit as any other.
#[tokio::test]
async fn a_huge_commit_during_intake_is_refused_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let free = Space::new(dir.path(), 0).free().unwrap().0;
    let options = SpoolOptions {
        // Room for small mail only: a commit must leave this much besides twice its size.
        min_free_space: free.saturating_sub(300 << 20),
        ..deferred(Duration::from_secs(2))
    };
    let huge = vec![b'x'; 256 << 20];
    let spool = Spool::open_with(dir.path(), &options).unwrap();
    let id = spool.next_id();
    let refused = spool
        .commit(vec![(envelope(id, id, "example.org", 1), huge)])
        .await;
    assert!(matches!(refused, Err(SpoolError::Full(_))), "{refused:?}");
    assert!(!spool.is_open());
    let small = commit_each(&spool, 1).await;
    spool.ready().await.unwrap();
    assert_holds_exactly(&spool, &small);
}

/// A spool whose sled cannot open keeps what the journal acknowledged, refuses everything
/// else with the reason, and the next open moves it.
#[tokio::test]
async fn a_failed_open_keeps_the_journal_for_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let holder = Spool::open(dir.path()).unwrap();
    let spool = Spool::open_with(dir.path(), &deferred(Duration::ZERO)).unwrap();
    let kept = commit_each(&spool, 1).await;
    let err = spool.ready().await.unwrap_err();
    assert!(err.to_string().contains("did not open"), "{err}");
    assert!(matches!(spool.recovery(), RecoveryStatus::Failed(_)));
    assert!(spool.list().is_err());
    drop(spool);
    drop(holder);
    let spool = Spool::open(dir.path()).unwrap();
    assert_holds_exactly(&spool, &kept);
}

/// A frame whose first key is present but whose envelope is another message's (ids reused:
/// a clock stepped back) is not taken as moved: the file is kept aside, nothing overwritten.
#[tokio::test]
async fn a_frame_whose_ids_collide_with_other_mail_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let new = crash_during_intake(dir.path(), 1).await;
    let (id, _) = new[0].clone();
    // Other mail under the same id, already in sled.
    {
        let spool = Spool::open(dir.path()).unwrap();
        drop(spool);
    }
    let path = journals(dir.path());
    assert!(path.is_empty(), "moved by the open above");
    let new = crash_during_intake(dir.path(), 1).await;
    let (id2, body2) = new[0].clone();
    assert_ne!(id, id2);
    {
        let db = open_sled(dir.path(), SpoolOptions::default().cache_size).unwrap();
        db.remove(clean_close::KEY).unwrap();
        let mut other = envelope(id2, id2, "other.example", 1);
        other.size = 3;
        db.insert(key(ENVELOPE, id2), encode(&other).unwrap())
            .unwrap();
        db.insert(due_key(1, id2), Vec::new()).unwrap();
        db.insert(key(BODY, id2), b"abc".to_vec()).unwrap();
        db.flush().unwrap();
    }
    let spool = Spool::open(dir.path()).unwrap();
    let aside = spool.journal_set_aside();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(aside[0].1, 0);
    assert!(aside[0].0.exists());
    // The other mail is untouched; the journal's message is in the file kept aside.
    assert_eq!(
        spool.envelope(id2).unwrap().unwrap().destination,
        "other.example"
    );
    assert_eq!(&spool.body(id2).unwrap().unwrap()[..], b"abc");
    assert_ne!(&body2[..], b"abc");
}
