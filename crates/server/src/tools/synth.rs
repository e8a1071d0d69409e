//! Synthetic registries: realistic names and valid ID numbers of people who
//! do not exist, deterministic for a seed (DOMAIN.md: surname shares of the
//! 2010 census, name lengths, minority names with U+00B7, rare characters
//! outside the BMP).

use std::collections::HashSet;

use psi_core::record::{CivilDate, IdNumber};
use rand::distributions::{Distribution, WeightedIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Surnames with their shares in per-mille of the population (top 100 of the
/// 2010 census, rounded; compound surnames at their small shares).
const SURNAMES: &[(&str, u32)] = &[
    ("王", 710),
    ("李", 696),
    ("张", 642),
    ("刘", 516),
    ("陈", 426),
    ("杨", 308),
    ("黄", 200),
    ("赵", 197),
    ("吴", 190),
    ("周", 186),
    ("徐", 166),
    ("孙", 154),
    ("马", 146),
    ("朱", 126),
    ("胡", 131),
    ("郭", 113),
    ("何", 117),
    ("高", 108),
    ("林", 118),
    ("罗", 86),
    ("郑", 97),
    ("梁", 89),
    ("谢", 76),
    ("宋", 72),
    ("唐", 80),
    ("许", 77),
    ("韩", 71),
    ("冯", 66),
    ("邓", 66),
    ("曹", 64),
    ("彭", 63),
    ("曾", 62),
    ("肖", 60),
    ("田", 59),
    ("董", 55),
    ("袁", 53),
    ("潘", 52),
    ("于", 51),
    ("蒋", 50),
    ("蔡", 50),
    ("余", 48),
    ("杜", 47),
    ("叶", 46),
    ("程", 45),
    ("苏", 44),
    ("魏", 43),
    ("吕", 42),
    ("丁", 41),
    ("任", 40),
    ("沈", 39),
    ("姚", 38),
    ("卢", 37),
    ("姜", 36),
    ("崔", 35),
    ("钟", 34),
    ("谭", 33),
    ("陆", 32),
    ("汪", 31),
    ("范", 30),
    ("金", 29),
    ("石", 28),
    ("廖", 27),
    ("贾", 26),
    ("夏", 25),
    ("韦", 25),
    ("付", 24),
    ("方", 24),
    ("白", 23),
    ("邹", 23),
    ("孟", 22),
    ("熊", 22),
    ("秦", 21),
    ("邱", 21),
    ("江", 20),
    ("尹", 20),
    ("薛", 19),
    ("闫", 19),
    ("段", 18),
    ("雷", 18),
    ("侯", 17),
    ("龙", 17),
    ("史", 17),
    ("陶", 16),
    ("黎", 16),
    ("贺", 16),
    ("顾", 15),
    ("毛", 15),
    ("郝", 15),
    ("龚", 14),
    ("邵", 14),
    ("万", 14),
    ("钱", 13),
    ("严", 13),
    ("覃", 13),
    ("武", 13),
    ("戴", 12),
    ("莫", 12),
    ("孔", 12),
    ("向", 11),
    ("汤", 11),
    ("阎", 3),
    ("萧", 3),
    ("於", 1),
    ("欧阳", 8),
    ("司马", 1),
    ("诸葛", 1),
    ("上官", 1),
];

/// Common given-name characters.
const GIVEN: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀", "霞", "平", "刚", "桂", "英", "华", "玉", "兰", "萍", "红", "鹏", "辉", "建", "国",
    "文", "斌", "宇", "浩", "凯", "健", "俊", "帆", "帅", "旭", "宁", "龙", "林", "欣", "佳", "婷",
    "雪", "琳", "晨", "阳", "思", "雨", "梓", "涵", "子", "怡", "轩", "然", "博", "嘉", "晓", "海",
    "志", "春", "小", "云", "金", "荣", "新", "昊", "天", "一", "诺", "泽", "瑞", "晶", "颖", "慧",
    "倩", "琴", "燕", "蕾", "薇", "琪", "璐", "瑶", "妍", "彤",
];

/// Rare given-name characters outside the BMP (CJK Extension B).
const RARE_GIVEN: &[&str] = &["𠮷", "𪚥"];

/// Syllables of transcribed minority names (joined with U+00B7).
const MINORITY: &[&str] = &[
    "阿依古丽",
    "买买提",
    "艾力",
    "古丽",
    "热依拉",
    "努尔",
    "阿不都",
    "帕尔哈提",
    "迪丽热巴",
    "扎西",
    "卓玛",
    "次仁",
    "央金",
    "巴特尔",
    "其木格",
];

/// Real-looking county-level address codes (the registry only checks the
/// province part; abolished codes stay valid for life).
const ADDRESSES: &[u32] = &[
    110_101, 110_105, 110_108, 120_101, 130_102, 140_105, 150_102, 210_102, 220_102, 230_102,
    310_101, 310_104, 310_115, 320_102, 330_106, 340_104, 350_102, 360_102, 370_102, 410_105,
    420_106, 430_104, 440_103, 440_305, 440_524, 450_103, 460_105, 500_103, 510_104, 520_102,
    530_102, 540_102, 610_104, 620_102, 630_102, 640_104, 650_102, 652_801,
];

/// One synthetic person.
#[derive(Clone, PartialEq, Eq)]
pub struct Person {
    /// Synthetic name.
    pub name: String,
    /// A valid ID number (it may coincide with a real person's: never mix
    /// synthetic data with real data).
    pub id: String,
}

impl std::fmt::Debug for Person {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Person(..)")
    }
}

/// An endless, deterministic stream of distinct synthetic people.
pub struct Generator {
    rng: ChaCha8Rng,
    surnames: WeightedIndex<u32>,
    today: CivilDate,
    seen: HashSet<[u8; 18]>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator").finish_non_exhaustive()
    }
}

impl Generator {
    /// A generator for `seed`; birth dates are not after `today`.
    ///
    /// # Errors
    /// Never in practice: the weight table is a non-empty constant.
    pub fn new(seed: u64, today: CivilDate) -> anyhow::Result<Self> {
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            surnames: WeightedIndex::new(SURNAMES.iter().map(|s| s.1))?,
            today,
            seen: HashSet::new(),
        })
    }

    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list.get(self.rng.gen_range(0..list.len()))
            .copied()
            .unwrap_or("")
    }

    fn name(&mut self) -> String {
        if self.rng.gen_ratio(1, 200) {
            let a = self.pick(MINORITY);
            let b = self.pick(MINORITY);
            return format!("{a}\u{b7}{b}");
        }
        let surname = SURNAMES
            .get(self.surnames.sample(&mut self.rng))
            .map_or("王", |s| s.0);
        // Full names: 3 characters ~85.6%, 2 ~14.2%, 4 ~0.2%.
        let roll = self.rng.gen_range(0..1000);
        let total_chars: usize = match roll {
            0..=141 => 2,
            142..=997 => 3,
            _ => 4,
        };
        let given_len = total_chars.saturating_sub(surname.chars().count()).max(1);
        let mut name = surname.to_string();
        for _ in 0..given_len {
            // Rare characters about once in 500 names.
            let c = if self.rng.gen_ratio(1, 1000) {
                self.pick(RARE_GIVEN)
            } else {
                self.pick(GIVEN)
            };
            name.push_str(c);
        }
        name
    }

    fn id(&mut self) -> String {
        loop {
            let address = ADDRESSES
                .get(self.rng.gen_range(0..ADDRESSES.len()))
                .copied()
                .unwrap_or(110_101);
            let year = self.rng.gen_range(1930..=self.today.year);
            let month = self.rng.gen_range(1..=12);
            let day = self.rng.gen_range(1..=28);
            let Some(birth) = CivilDate::new(year, month, day).filter(|d| *d <= self.today) else {
                continue;
            };
            let sequence = self.rng.gen_range(0..1000);
            let Ok(id) = IdNumber::from_parts(address, birth, sequence, self.today) else {
                continue;
            };
            let mut key = [0u8; 18];
            key.copy_from_slice(id.as_str().as_bytes());
            if self.seen.insert(key) {
                return id.as_str().to_string();
            }
        }
    }
}

impl Iterator for Generator {
    type Item = Person;

    fn next(&mut self) -> Option<Person> {
        let name = self.name();
        let id = self.id();
        Some(Person { name, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use psi_core::Record;

    const TODAY: CivilDate = CivilDate {
        year: 2026,
        month: 11,
        day: 22,
    };

    #[test]
    fn deterministic_valid_and_realistic() {
        let a: Vec<Person> = Generator::new(7, TODAY).unwrap().take(20_000).collect();
        let b: Vec<Person> = Generator::new(7, TODAY).unwrap().take(20_000).collect();
        assert!(a == b);
        let c: Vec<Person> = Generator::new(8, TODAY).unwrap().take(100).collect();
        assert!(a[..100] != c[..]);
        for p in &a {
            Record::parse(&p.name, &p.id, TODAY).unwrap();
        }
        let wang = a.iter().filter(|p| p.name.starts_with('王')).count() as f64 / a.len() as f64;
        assert!((0.05..0.10).contains(&wang), "王 share {wang}");
        let three =
            a.iter().filter(|p| p.name.chars().count() == 3).count() as f64 / a.len() as f64;
        assert!((0.75..0.92).contains(&three), "3-character share {three}");
        assert!(a.iter().any(|p| p.name.contains('\u{b7}')));
        let ids: HashSet<&str> = a.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), a.len());
    }
}
