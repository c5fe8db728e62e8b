//! The gptprio backend: GRUB's `gptprio.next` rules (ACL, Flatcar, ChromeOS,
//! Bottlerocket) over GPT partition attribute bits.
//!
//! Bits 48-51 hold the priority, 52-55 the tries left, 56 "successful".
//! GRUB boots the highest-priority partition of the slot type that has tries
//! left or is successful (the first in table order on a tie; priority 0
//! never boots), and decrements its tries before booting it.

use serde::Serialize;

use crate::SlotName;

/// A GPT attribute word seen through the gptprio rules. Every bit outside
/// 48-56 is preserved by every method.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GptPrio(u64);

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_BIT: u64 = 1 << 56;
const NIBBLE: u64 = 0xf;
/// The largest priority or tries count the 4-bit fields hold.
pub const MAX_FIELD: u8 = 15;

impl GptPrio {
    pub const fn from_attributes(word: u64) -> Self {
        GptPrio(word)
    }

    pub const fn attributes(self) -> u64 {
        self.0
    }

    pub const fn priority(self) -> u8 {
        ((self.0 >> PRIORITY_SHIFT) & NIBBLE) as u8
    }

    pub const fn tries(self) -> u8 {
        ((self.0 >> TRIES_SHIFT) & NIBBLE) as u8
    }

    pub const fn successful(self) -> bool {
        self.0 & SUCCESSFUL_BIT != 0
    }

    /// Sets the priority; values above 15 are clamped to 15.
    #[must_use]
    pub const fn with_priority(self, priority: u8) -> Self {
        let value = if priority > MAX_FIELD {
            MAX_FIELD
        } else {
            priority
        } as u64;
        GptPrio((self.0 & !(NIBBLE << PRIORITY_SHIFT)) | (value << PRIORITY_SHIFT))
    }

    /// Sets the tries left; values above 15 are clamped to 15.
    #[must_use]
    pub const fn with_tries(self, tries: u8) -> Self {
        let value = if tries > MAX_FIELD { MAX_FIELD } else { tries } as u64;
        GptPrio((self.0 & !(NIBBLE << TRIES_SHIFT)) | (value << TRIES_SHIFT))
    }

    #[must_use]
    pub const fn with_successful(self, successful: bool) -> Self {
        if successful {
            GptPrio(self.0 | SUCCESSFUL_BIT)
        } else {
            GptPrio(self.0 & !SUCCESSFUL_BIT)
        }
    }

    /// GRUB would consider it at all: tries left or successful. (Priority
    /// decides among those; priority 0 never boots.)
    pub const fn may_boot(self) -> bool {
        self.tries() > 0 || self.successful()
    }

    /// GRUB can boot it: priority above 0 and tries left or successful.
    pub const fn is_bootable(self) -> bool {
        self.priority() > 0 && self.may_boot()
    }

    /// A human word for the state.
    pub fn status(self) -> SlotStatus {
        if !self.is_bootable() {
            SlotStatus::Unbootable
        } else if self.successful() {
            SlotStatus::Good
        } else {
            SlotStatus::Trying
        }
    }
}

impl std::fmt::Debug for GptPrio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GptPrio(priority={}, tries={}, successful={})",
            self.priority(),
            self.tries(),
            u8::from(self.successful())
        )
    }
}

/// What a slot's boot state means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotStatus {
    /// Marked good: boots whenever it has the highest priority.
    Good,
    /// Not yet good, with boot tries left: on trial.
    Trying,
    /// Will not be booted.
    Unbootable,
}

/// The attribute words of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPair {
    pub a: GptPrio,
    pub b: GptPrio,
}

/// A transition that would leave the disk in a state the rules forbid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("tries must be between 1 and {MAX_FIELD}, not {0}")]
    BadTries(u8),
    #[error("refusing: slot {target} is the only bootable slot; slot {other} is {why}, so nothing would boot")]
    NothingWouldBoot {
        target: SlotName,
        other: SlotName,
        why: &'static str,
    },
    #[error("nothing to cancel: {0}")]
    NothingToCancel(String),
}

impl SlotPair {
    pub fn get(&self, slot: SlotName) -> GptPrio {
        match slot {
            SlotName::A => self.a,
            SlotName::B => self.b,
        }
    }

    #[must_use]
    pub fn with(mut self, slot: SlotName, value: GptPrio) -> Self {
        match slot {
            SlotName::A => self.a = value,
            SlotName::B => self.b = value,
        }
        self
    }

    /// *clear*: the slot can never boot (0/0/0). Written before any payload
    /// byte so that a half-written slot is never booted.
    #[must_use]
    pub fn clear(self, target: SlotName) -> Self {
        let word = self
            .get(target)
            .with_priority(0)
            .with_tries(0)
            .with_successful(false);
        self.with(target, word)
    }

    /// *set next*: boot `target` next, on trial: priority above the other
    /// slot's, `tries` tries, not successful. When the other slot already
    /// has the top priority (15), it moves down one so `target` can be above it.
    pub fn set_next(self, target: SlotName, tries: u8) -> Result<Self, TransitionError> {
        if tries == 0 || tries > MAX_FIELD {
            return Err(TransitionError::BadTries(tries));
        }
        let other = target.other();
        let mut other_word = self.get(other);
        if other_word.priority() == MAX_FIELD {
            other_word = other_word.with_priority(MAX_FIELD - 1);
        }
        let target_word = self
            .get(target)
            .with_priority(other_word.priority() + 1)
            .with_tries(tries)
            .with_successful(false);
        Ok(self.with(other, other_word).with(target, target_word))
    }

    /// *mark good*: successful, no tries left (priority unchanged).
    #[must_use]
    pub fn mark_good(self, target: SlotName) -> Self {
        let word = self.get(target).with_successful(true).with_tries(0);
        self.with(target, word)
    }

    /// *mark bad*: the slot never boots again until set next (priority 0,
    /// tries 0, not successful); the other slot boots first. Refused when
    /// the other slot cannot boot, since then nothing would.
    pub fn mark_bad(self, target: SlotName) -> Result<Self, TransitionError> {
        let other = target.other();
        let mut other_word = self.get(other);
        if !other_word.may_boot() {
            return Err(TransitionError::NothingWouldBoot {
                target,
                other,
                why: "neither successful nor left with tries",
            });
        }
        if other_word.priority() == 0 {
            other_word = other_word.with_priority(1);
        }
        Ok(self.clear(target).with(other, other_word))
    }

    /// *cancel*: undo a set next of `target` (priority 0, tries 0). Refused
    /// when `target` is not on trial, or when the other slot cannot boot.
    pub fn cancel(self, target: SlotName) -> Result<Self, TransitionError> {
        let word = self.get(target);
        if word.status() != SlotStatus::Trying {
            return Err(TransitionError::NothingToCancel(format!(
                "slot {target} is not set to boot on trial"
            )));
        }
        if !self.get(target.other()).is_bootable() {
            return Err(TransitionError::NothingWouldBoot {
                target,
                other: target.other(),
                why: "not bootable",
            });
        }
        Ok(self.with(target, word.with_priority(0).with_tries(0)))
    }
}

/// One partition as `gptprio.next` sees it: whether its type is the slot
/// type, and its attribute word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub is_slot_type: bool,
    pub prio: GptPrio,
}

/// What GRUB's `gptprio.next` does with a table, as a pure function: the
/// index (in table order) of the partition it boots, with that partition's
/// tries already decremented in `table`; `None` when nothing can boot.
pub fn gptprio_next(table: &mut [Candidate]) -> Option<usize> {
    let mut found: Option<usize> = None;
    for (index, candidate) in table.iter().enumerate() {
        if !candidate.is_slot_type || !candidate.prio.may_boot() {
            continue;
        }
        let best = found.map_or(0, |i| table[i].prio.priority());
        if candidate.prio.priority() > best {
            found = Some(index);
        }
    }
    let index = found?;
    let prio = table[index].prio;
    if prio.tries() > 0 {
        table[index].prio = prio.with_tries(prio.tries() - 1);
    }
    Some(index)
}

/// `gptprio_next` over just the two slots (A before B in table order, as in
/// every ACL/Flatcar layout).
pub fn next_boot(pair: &mut SlotPair) -> Option<SlotName> {
    let mut table = [
        Candidate {
            is_slot_type: true,
            prio: pair.a,
        },
        Candidate {
            is_slot_type: true,
            prio: pair.b,
        },
    ];
    let chosen = gptprio_next(&mut table)?;
    pair.a = table[0].prio;
    pair.b = table[1].prio;
    Some(SlotName::BOTH[chosen])
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlotName::{A, B};

    fn prio(priority: u8, tries: u8, successful: bool) -> GptPrio {
        GptPrio::default()
            .with_priority(priority)
            .with_tries(tries)
            .with_successful(successful)
    }

    /// A Flatcar image as shipped: A good at priority 1, B empty.
    fn fresh() -> SlotPair {
        SlotPair {
            a: prio(1, 0, true),
            b: prio(0, 0, false),
        }
    }

    #[test]
    fn fields_use_bits_48_to_56_and_keep_the_rest() {
        let other_bits = 0x8000_0000_0000_0001u64 | (1 << 60);
        let word = GptPrio::from_attributes(other_bits)
            .with_priority(2)
            .with_tries(3)
            .with_successful(true);
        assert_eq!(
            word.attributes(),
            other_bits | (2 << 48) | (3 << 52) | (1 << 56)
        );
        assert_eq!(
            (word.priority(), word.tries(), word.successful()),
            (2, 3, true)
        );
        let cleared = word.with_priority(0).with_tries(0).with_successful(false);
        assert_eq!(cleared.attributes(), other_bits);
        assert_eq!(GptPrio::default().with_priority(99).priority(), 15);
    }

    #[test]
    fn set_next_then_two_boots_without_mark_good_falls_back() {
        let mut pair = fresh().set_next(B, 1).unwrap();
        assert_eq!(pair.b, prio(2, 1, false));
        assert_eq!(pair.a, prio(1, 0, true), "A unchanged");
        assert_eq!(next_boot(&mut pair), Some(B));
        assert_eq!(pair.b.tries(), 0, "GRUB spends the try before booting");
        assert_eq!(
            next_boot(&mut pair),
            Some(A),
            "B never marked good: back to A"
        );
        assert_eq!(next_boot(&mut pair), Some(A));
    }

    #[test]
    fn set_next_then_mark_good_keeps_booting_the_new_slot() {
        let mut pair = fresh().set_next(B, 1).unwrap();
        assert_eq!(next_boot(&mut pair), Some(B));
        pair = pair.mark_good(B);
        assert_eq!(pair.b, prio(2, 0, true));
        assert_eq!(next_boot(&mut pair), Some(B));
        assert_eq!(next_boot(&mut pair), Some(B));
    }

    #[test]
    fn set_next_with_more_tries_gives_that_many_boots() {
        let mut pair = fresh().set_next(B, 3).unwrap();
        let boots: Vec<_> = (0..5).map(|_| next_boot(&mut pair).unwrap()).collect();
        assert_eq!(boots, [B, B, B, A, A]);
    }

    #[test]
    fn set_next_over_a_top_priority_slot_moves_it_down() {
        let pair = SlotPair {
            a: prio(15, 0, true),
            b: prio(0, 0, false),
        }
        .set_next(B, 1)
        .unwrap();
        assert_eq!((pair.a.priority(), pair.b.priority()), (14, 15));
        assert_eq!(fresh().set_next(B, 0), Err(TransitionError::BadTries(0)));
        assert_eq!(fresh().set_next(B, 16), Err(TransitionError::BadTries(16)));
    }

    #[test]
    fn mark_bad_puts_the_other_first_and_refuses_to_brick() {
        let mut pair = fresh()
            .set_next(B, 1)
            .unwrap()
            .mark_good(B)
            .mark_bad(B)
            .unwrap();
        assert_eq!(pair.b, prio(0, 0, false));
        assert_eq!(next_boot(&mut pair), Some(A));
        let lonely = SlotPair {
            a: prio(0, 0, false),
            b: prio(2, 0, true),
        };
        assert!(matches!(
            lonely.mark_bad(B),
            Err(TransitionError::NothingWouldBoot { .. })
        ));
        let zero_priority_good = SlotPair {
            a: prio(0, 0, true),
            b: prio(2, 0, true),
        };
        let mut after = zero_priority_good.mark_bad(B).unwrap();
        assert_eq!(
            after.a.priority(),
            1,
            "the other slot is given a priority so it boots"
        );
        assert_eq!(next_boot(&mut after), Some(A));
    }

    #[test]
    fn cancel_undoes_set_next_only() {
        let staged = fresh().set_next(B, 1).unwrap();
        let mut cancelled = staged.cancel(B).unwrap();
        assert_eq!(cancelled.b, prio(0, 0, false));
        assert_eq!(next_boot(&mut cancelled), Some(A));
        assert!(matches!(
            fresh().cancel(B),
            Err(TransitionError::NothingToCancel(_))
        ));
    }

    #[test]
    fn clear_zeroes_the_slot() {
        let pair = fresh().set_next(B, 2).unwrap().clear(B);
        assert_eq!(pair.b, prio(0, 0, false));
    }

    #[test]
    fn gptprio_next_follows_grub() {
        let slot = |p, t, s| Candidate {
            is_slot_type: true,
            prio: prio(p, t, s),
        };
        let mut tie = [slot(2, 0, true), slot(2, 0, true)];
        assert_eq!(gptprio_next(&mut tie), Some(0), "lowest index wins a tie");
        let mut zero = [slot(0, 3, true)];
        assert_eq!(gptprio_next(&mut zero), None, "priority 0 never boots");
        let mut foreign = [
            Candidate {
                is_slot_type: false,
                prio: prio(9, 1, true),
            },
            slot(1, 0, true),
        ];
        assert_eq!(
            gptprio_next(&mut foreign),
            Some(1),
            "other partition types are ignored"
        );
        let mut good_with_tries = [slot(1, 2, true)];
        assert_eq!(gptprio_next(&mut good_with_tries), Some(0));
        assert_eq!(
            good_with_tries[0].prio.tries(),
            1,
            "tries drop even on a good slot"
        );
        let mut spent = [slot(5, 0, false), slot(1, 0, true)];
        assert_eq!(gptprio_next(&mut spent), Some(1));
    }
}
