//! The answer's hot loops, each compiled twice: for the target the crate
//! is built for, and for AVX2, chosen at run time on CPUs that have it
//! (`is_x86_feature_detected!`). spiral-rs has AVX2 kernels only in a build
//! for an AVX2 CPU (`-C target-cpu=...`); this makes the default build as
//! fast. The code is plain Rust the compiler vectorises: 32-bit lanes for
//! the transforms (every value stays below `4m < 2^30`), 32x32->64-bit
//! products for the sums.
//!
//! The plain database's pass (the LWE family's answer, `plain`) is compiled
//! three times: portable, AVX2 and AVX-512, the widest the CPU has chosen
//! at run time; for one query on a CPU with AVX-512 VNNI, a hand-written
//! kernel (`column_sums_vnni`) multiplies 16-bit limbs with `vpdpwssd`.
//!
//! `matrix_product` is `matrixmultiply`'s `dgemm` behind a safe face (the
//! YPIR+SP hint's patch).
//!
//! The only `unsafe` of the crate: calling the AVX2 or AVX-512 build after
//! the CPU was seen to support it, that kernel's unaligned loads of 64
//! bytes from slices just taken with that length, and `dgemm` on slices
//! whose lengths were checked against the strides it is given.

#![allow(unsafe_code)]
// Fixed-size arithmetic; callers assert the sizes, and the answer runs
// under `catch_unwind` besides.
#![allow(clippy::indexing_slicing)]

/// Coefficients of every polynomial (shape.rs fixes the ring).
pub(crate) const N: usize = 2048;

/// Defines `pub(crate) fn $name`, which runs `$body` compiled for AVX2
/// (`$avx`) when the CPU has it and as built (`$portable`) otherwise.
macro_rules! with_avx2 {
    (
        $(#[$doc:meta])*
        fn $name:ident / $portable:ident / $avx:ident ($($arg:ident: $ty:ty),*) $body:block
    ) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { $avx($($arg),*) };
                return;
            }
            $portable($($arg),*);
        }

        #[inline(always)]
        fn $portable($($arg: $ty),*) $body

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx($($arg: $ty),*) {
            $portable($($arg),*);
        }
    };
}

with_avx2! {
    /// Forward NTT of one residue polynomial, bit for bit spiral-rs's
    /// `ntt_forward`: Cooley-Tukey with Harvey's lazy butterflies, inputs
    /// below `4m`, outputs reduced to `[0, m)`. `w` are the root powers in
    /// bit-reversed order and `wp` = `floor(w * 2^32 / m)`.
    fn forward / forward_portable / forward_avx2(a: &mut [u32; N], w: &[u64], wp: &[u64], m: u32) {
        let mut groups = 1;
        let mut t = N / 2;
        while groups < N {
            let tables = (&w[groups..2 * groups], &wp[groups..2 * groups]);
            // Constant distances for the last stages, so the compiler
            // vectorises across their groups (butterflies 1-4 apart).
            match t {
                1 => forward_stage(a, tables, m, 1),
                2 => forward_stage(a, tables, m, 2),
                4 => forward_stage(a, tables, m, 4),
                _ => forward_stage(a, tables, m, t),
            }
            groups *= 2;
            t /= 2;
        }
        reduce_lanes(a, m);
    }
}

/// One forward stage: butterflies `t` apart, group `i` with twiddle `w[i]`.
#[inline(always)]
fn forward_stage(a: &mut [u32; N], (w, wp): (&[u64], &[u64]), m: u32, t: usize) {
    let two_m = 2 * m;
    for ((chunk, &wi), &wpi) in a.chunks_exact_mut(2 * t).zip(w).zip(wp) {
        let (wi, wpi) = (wi as u32, wpi as u32);
        let (xs, ys) = chunk.split_at_mut(t);
        for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
            let cx = if *x >= two_m { *x - two_m } else { *x };
            let q = ((u64::from(*y) * u64::from(wpi)) >> 32) as u32;
            let r = wi.wrapping_mul(*y).wrapping_sub(q.wrapping_mul(m));
            *x = cx + r;
            *y = cx + two_m - r;
        }
    }
}

with_avx2! {
    /// Inverse NTT of one residue polynomial, bit for bit spiral-rs's
    /// `ntt_inverse`: Gentleman-Sande with the halving folded into each
    /// stage (the inverse tables hold `w / 2`), inputs below `m`, outputs
    /// in `[0, m)`.
    fn inverse / inverse_portable / inverse_avx2(a: &mut [u32; N], w: &[u64], wp: &[u64], m: u32) {
        let mut h = N / 2;
        let mut t = 1;
        while h >= 1 {
            let tables = (&w[h..2 * h], &wp[h..2 * h]);
            match t {
                1 => inverse_stage(a, tables, m, 1),
                2 => inverse_stage(a, tables, m, 2),
                4 => inverse_stage(a, tables, m, 4),
                _ => inverse_stage(a, tables, m, t),
            }
            h /= 2;
            t *= 2;
        }
        reduce_lanes(a, m);
    }
}

/// One inverse stage: butterflies `t` apart, group `i` with twiddle `w[i]`.
#[inline(always)]
fn inverse_stage(a: &mut [u32; N], (w, wp): (&[u64], &[u64]), m: u32, t: usize) {
    let two_m = 2 * m;
    for ((chunk, &wi), &wpi) in a.chunks_exact_mut(2 * t).zip(w).zip(wp) {
        let (wi, wpi) = (wi as u32, wpi as u32);
        let (xs, ys) = chunk.split_at_mut(t);
        for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
            let (xv, yv) = (*x, *y);
            let s = two_m - yv + xv;
            let sum = xv + yv;
            let cx = if sum >= two_m { sum - two_m } else { sum };
            let q = ((u64::from(s) * u64::from(wpi)) >> 32) as u32;
            *x = (cx + if s & 1 == 1 { m } else { 0 }) >> 1;
            *y = wi.wrapping_mul(s).wrapping_sub(q.wrapping_mul(m));
        }
    }
}

/// `[0, 4m)` to `[0, m)`.
#[inline(always)]
fn reduce_lanes(a: &mut [u32; N], m: u32) {
    let two_m = 2 * m;
    for x in a.iter_mut() {
        if *x >= two_m {
            *x -= two_m;
        }
        if *x >= m {
            *x -= m;
        }
    }
}

with_avx2! {
    /// `acc += a * b` coefficient by coefficient, unreduced: residues below
    /// 2^28, so each product is below 2^56 and 64 of them fit.
    fn multiply_add / multiply_add_portable / multiply_add_avx2(acc: &mut [u64], a: &[u64], b: &[u64]) {
        for ((s, &x), &y) in acc.iter_mut().zip(a).zip(b) {
            *s += u64::from(x as u32) * u64::from(y as u32);
        }
    }
}

with_avx2! {
    /// The first dimension at one coefficient: for each item polynomial
    /// word `b` of `items` (`sums.len()` runs of `query.len() / 2`), the
    /// sums of `query`'s (row 0, row 1) pairs times `b`, per CRT residue
    /// (low and high 32 bits of every word): `[r0 m0, r0 m1, r1 m0, r1 m1]`.
    /// At most 128 terms: each product is below 2^56.
    fn first_dimension_sums / first_dimension_sums_portable / first_dimension_sums_avx2(
        query: &[u64],
        items: &[u64],
        sums: &mut [[u64; 4]]
    ) {
        const LOW: u64 = 0xffff_ffff;
        let dim0 = query.len() / 2;
        for (s, b) in sums.iter_mut().zip(items.chunks_exact(dim0)) {
            let (mut s00, mut s01, mut s10, mut s11) = (0u64, 0u64, 0u64, 0u64);
            for (pair, &w) in query.chunks_exact(2).zip(b) {
                let (w0, w1) = (w & LOW, w >> 32);
                s00 += (pair[0] & LOW) * w0;
                s10 += (pair[0] >> 32) * w1;
                s01 += (pair[1] & LOW) * w0;
                s11 += (pair[1] >> 32) * w1;
            }
            *s = [s00, s10, s01, s11];
        }
    }
}

/// Rows of a plain database's tile, passed at a time: the queries' slice
/// of them (`PASS_CHUNK_ROWS` x 8 bytes each) stays in the core's L2 cache
/// while every column of the tile streams past, and a column's sum stays
/// below `2^15 x (2^32 - 1) x (2^16 - 1) < 2^63`: no overflow, whatever
/// the residues' and words' sizes.
pub(crate) const PASS_CHUNK_ROWS: usize = 1 << 15;

/// The instruction set a pass over a plain database is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The crate's target, whatever it is (the compiler's own vectors).
    Portable,
    /// AVX2: 4 lanes of 32x32->64-bit products.
    Avx2,
    /// AVX-512 (F): 8 lanes.
    Avx512,
}

impl Kernel {
    /// The widest this CPU runs.
    #[must_use]
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Whether this CPU runs it.
    #[must_use]
    pub fn available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// `c = a b` in `f64`: `a` is `m x k` stored column by column (`a[i + m
/// l]`), `b` is `k x n` with row `l` from `b[l * b_row]`, `c` is `m x n`
/// column by column. `None` (nothing written) when a slice is shorter than
/// its matrix.
pub(crate) fn matrix_product(
    (m, k, n): (usize, usize, usize),
    a: &[f64],
    (b, b_row): (&[f64], usize),
    c: &mut [f64],
) -> Option<()> {
    let b_needs = match k {
        0 => 0,
        k => (k - 1).checked_mul(b_row)?.checked_add(n)?,
    };
    let fits = a.len() >= m.checked_mul(k)?
        && c.len() >= m.checked_mul(n)?
        && n <= b_row
        && b.len() >= b_needs
        && isize::try_from(m.max(b_row)).is_ok();
    if !fits {
        return None;
    }
    // SAFETY: dgemm reads a[i + m l] (i < m, l < k), b[l b_row + j]
    // (j < n), writes c[i + m j]: all within the lengths checked above;
    // the strides fit isize (checked).
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            b_row as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            1,
            m as isize,
        );
    }
    Some(())
}

/// The first pass of K queries over a tile of a plain database held
/// column by column (`rows` words each, at most `PASS_CHUNK_ROWS`): for
/// each column `j` and query `k`, `out[j][k]` gets `(sum_i lo(q_k[i]) d[i][j]
/// mod p_lo) | (sum_i hi(q_k[i]) d[i][j] mod p_hi) << 32`, where a query
/// word carries two residues (low and high 32 bits). Built for `kernel`,
/// which the caller saw [`Kernel::available`].
pub(crate) fn plain_pass<const K: usize>(
    kernel: Kernel,
    queries: [&[u64]; K],
    db: &[u16],
    rows: usize,
    moduli: (u64, u64),
    out: &mut [[u64; K]],
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if Kernel::Avx512.available() => {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            unsafe { plain_pass_avx512(queries, db, rows, moduli, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if Kernel::Avx2.available() => {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { plain_pass_avx2(queries, db, rows, moduli, out) }
        }
        _ => plain_pass_portable(queries, db, rows, moduli, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn plain_pass_avx512<const K: usize>(
    queries: [&[u64]; K],
    db: &[u16],
    rows: usize,
    moduli: (u64, u64),
    out: &mut [[u64; K]],
) {
    // VNNI for one query only: measured on a Xeon with 1 GiB, one query
    // faster than the compiler's build, but more queries slower (six limb
    // registers a query leave too few for the sums, and each query's limbs
    // are loaded for every column).
    if K == 1
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        let query = queries[0];
        // The query's limbs for this tile, made once for its columns.
        let limbs = limbs(query);
        let mut columns = db.chunks_exact(rows.max(1));
        let mut out = out.iter_mut();
        loop {
            let sums = match (columns.next(), columns.next()) {
                // SAFETY: the CPU has AVX-512F, BW and VNNI (checked above).
                (Some(a), Some(b)) => unsafe { column_sums_vnni(&limbs, query, [a, b]) }.to_vec(),
                // SAFETY: as above.
                (Some(a), None) => unsafe { column_sums_vnni(&limbs, query, [a]) }.to_vec(),
                _ => break,
            };
            for ((lo, hi), acc) in sums.into_iter().zip(out.by_ref()) {
                acc[0] = (lo % moduli.0) | ((hi % moduli.1) << 32);
            }
        }
        return;
    }
    plain_pass_portable(queries, db, rows, moduli, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn plain_pass_avx2<const K: usize>(
    queries: [&[u64]; K],
    db: &[u16],
    rows: usize,
    moduli: (u64, u64),
    out: &mut [[u64; K]],
) {
    plain_pass_portable(queries, db, rows, moduli, out);
}

#[inline(always)]
fn plain_pass_portable<const K: usize>(
    queries: [&[u64]; K],
    db: &[u16],
    rows: usize,
    moduli: (u64, u64),
    out: &mut [[u64; K]],
) {
    plain_pass_with(queries, db, rows, moduli, out, column_sums);
}

/// The pass over one tile (`rows` at most `PASS_CHUNK_ROWS`), each
/// column's sums by `sums`, reduced modulo the residues' primes.
#[inline(always)]
fn plain_pass_with<const K: usize>(
    queries: [&[u64]; K],
    db: &[u16],
    rows: usize,
    (p_lo, p_hi): (u64, u64),
    out: &mut [[u64; K]],
    sums: impl Fn([&[u64]; K], &[u16]) -> ([u64; K], [u64; K]),
) {
    debug_assert!(rows <= PASS_CHUNK_ROWS);
    for (acc, column) in out.iter_mut().zip(db.chunks_exact(rows.max(1))) {
        let (lo, hi) = sums(queries, column);
        for k in 0..K {
            acc[k] = (lo[k] % p_lo) | ((hi[k] % p_hi) << 32);
        }
    }
}

/// One column's chunk against K queries' chunks: the low and high sums.
/// Plain Rust the compiler vectorises (the portable and AVX2 builds).
#[inline(always)]
fn column_sums<const K: usize>(qs: [&[u64]; K], column: &[u16]) -> ([u64; K], [u64; K]) {
    let mut lo = [0u64; K];
    let mut hi = [0u64; K];
    let n = column.len();
    // Equal lengths, said once: the loop's indexing needs no checks.
    assert!(qs.iter().all(|q| q.len() == n));
    for i in 0..n {
        let d = u64::from(column[i]);
        for k in 0..K {
            let q = qs[k][i];
            // Below 2^63 for a chunk (PASS_CHUNK_ROWS): never wraps.
            lo[k] = lo[k].wrapping_add(u64::from(q as u32) * d);
            hi[k] = hi[k].wrapping_add((q >> 32) * d);
        }
    }
    (lo, hi)
}

/// Rows an AVX-512 iteration takes: one register of 32 words.
#[cfg(target_arch = "x86_64")]
const VNNI_STEP: usize = 32;

/// Bits of a residue's limbs for the AVX-512 VNNI kernel: a limb times a
/// word is below `2^11 x 2^14 = 2^25`, a pair's sum below `2^26`, so a
/// 32-bit lane takes 31 steps before it must be widened.
#[cfg(target_arch = "x86_64")]
const LIMB_BITS: u32 = 11;

/// Steps between widenings of the 32-bit sums.
#[cfg(target_arch = "x86_64")]
const VNNI_FLUSH: usize = 31;

/// A query's residues cut into limbs for [`column_sums_vnni`]: six arrays
/// (low residue's limbs 0-2, then the high one's), one `u16` a row.
#[cfg(target_arch = "x86_64")]
fn limbs(q: &[u64]) -> [Vec<u16>; 6] {
    let mask = (1u64 << LIMB_BITS) - 1;
    std::array::from_fn(|l| {
        let shift = (l as u32 % 3) * LIMB_BITS;
        q.iter()
            .map(|&w| {
                let residue = if l < 3 { w & 0xffff_ffff } else { w >> 32 };
                ((residue >> shift) & mask) as u16
            })
            .collect()
    })
}

/// [`column_sums`] for one query and `C` columns with AVX-512 VNNI: the
/// query's residues cut into three 11-bit limbs each, a pair of words times
/// a pair of limbs added into a 32-bit lane by one instruction (`vpdpwssd`:
/// 32 words of a column a step for each limb), the 32-bit sums widened to
/// 64 bits every [`VNNI_FLUSH`] steps. Each limb loaded serves the `C`
/// columns. The words must be below 2^15 (the database's are below 2^14).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn column_sums_vnni<const C: usize>(
    limbs: &[Vec<u16>; 6],
    query: &[u64],
    columns: [&[u16]; C],
) -> [(u64, u64); C] {
    use std::arch::x86_64::{
        __m512i, _mm512_add_epi64, _mm512_castsi512_si256, _mm512_cvtepu32_epi64,
        _mm512_dpwssd_epi32, _mm512_extracti64x4_epi64, _mm512_loadu_si512,
        _mm512_reduce_add_epi64, _mm512_setzero_si512, _mm512_slli_epi64,
    };
    let n = query.len();
    assert!(limbs.iter().all(|v| v.len() == n) && columns.iter().all(|c| c.len() == n));
    let main = n - n % VNNI_STEP;
    let zero = _mm512_setzero_si512();
    let mut narrow: [[__m512i; 6]; C] = [[zero; 6]; C];
    // The 64-bit sums of each residue, the limbs shifted into place as they
    // are widened: two registers a column.
    let mut wide: [[__m512i; 2]; C] = [[zero; 2]; C];
    let widen = |narrow: &mut [[__m512i; 6]; C], wide: &mut [[__m512i; 2]; C]| {
        for c in 0..C {
            for l in 0..6 {
                let v = narrow[c][l];
                let low = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(v));
                let high = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(v, 1));
                let sum = _mm512_add_epi64(low, high);
                let placed = match l % 3 {
                    0 => sum,
                    1 => _mm512_slli_epi64::<11>(sum),
                    _ => _mm512_slli_epi64::<22>(sum),
                };
                wide[c][l / 3] = _mm512_add_epi64(wide[c][l / 3], placed);
                narrow[c][l] = zero;
            }
        }
    };
    let mut steps = 0;
    let mut base = 0;
    while base < main {
        let d: [__m512i; C] = columns.map(|column| {
            let words = &column[base..base + VNNI_STEP];
            // SAFETY: `words` is 32 u16 = 64 readable bytes; an unaligned
            // load.
            unsafe { _mm512_loadu_si512(words.as_ptr().cast()) }
        });
        for l in 0..6 {
            let part = &limbs[l][base..base + VNNI_STEP];
            // SAFETY: `part` is 32 u16 = 64 readable bytes.
            let q = unsafe { _mm512_loadu_si512(part.as_ptr().cast()) };
            for c in 0..C {
                narrow[c][l] = _mm512_dpwssd_epi32(narrow[c][l], d[c], q);
            }
        }
        steps += 1;
        if steps == VNNI_FLUSH {
            widen(&mut narrow, &mut wide);
            steps = 0;
        }
        base += VNNI_STEP;
    }
    widen(&mut narrow, &mut wide);
    let mut sums = [(0, 0); C];
    for c in 0..C {
        let (lo, hi) = column_sums([&query[main..]], &columns[c][main..]);
        sums[c] = (
            lo[0].wrapping_add(_mm512_reduce_add_epi64(wide[c][0]) as u64),
            hi[0].wrapping_add(_mm512_reduce_add_epi64(wide[c][1]) as u64),
        );
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_product_is_the_definition_and_refuses_short_slices() {
        // a 3 x 2 (column by column), b 2 x 2 read from rows of 3.
        let a = [1.0, 2.0, 3.0, -4.0, 5.0, -6.0];
        let b = [7.0, -8.0, 99.0, 9.0, 10.0];
        let mut c = [0.0; 6];
        matrix_product((3, 2, 2), &a, (&b, 3), &mut c).unwrap();
        assert_eq!(c, [-29.0, 59.0, -33.0, -48.0, 34.0, -84.0]);
        let mut short = [0.0; 5];
        assert!(matrix_product((3, 2, 2), &a, (&b, 3), &mut short).is_none());
        assert!(matrix_product((3, 2, 2), &a[..5], (&b, 3), &mut c).is_none());
        assert!(matrix_product((3, 2, 2), &a, (&b[..4], 3), &mut c).is_none());
        assert!(matrix_product((3, 2, 4), &a, (&b, 3), &mut [0.0; 12]).is_none());
        assert_eq!(short, [0.0; 5]);
    }

    #[test]
    fn the_avx2_build_agrees_with_the_portable_one() {
        // Each kernel through the dispatch (AVX2 where the CPU has it)
        // against its build for the crate's target.
        let m = 268_369_921u32;
        let w: Vec<u64> = (0..N as u64)
            .map(|i| (i * 7919 + 3) % u64::from(m))
            .collect();
        let wp: Vec<u64> = w.iter().map(|&x| (x << 32) / u64::from(m)).collect();
        let mut a = [0u32; N];
        for (i, x) in a.iter_mut().enumerate() {
            *x = (i as u32).wrapping_mul(2_654_435_761) % m;
        }
        let mut dispatched = a;
        forward(&mut dispatched, &w, &wp, m);
        let mut here = a;
        forward_portable(&mut here, &w, &wp, m);
        assert_eq!(dispatched, here);
        inverse(&mut dispatched, &w, &wp, m);
        inverse_portable(&mut here, &w, &wp, m);
        assert_eq!(dispatched, here);

        let x: Vec<u64> = (0..64u64).map(|i| i * 0x0fff_ffff % u64::from(m)).collect();
        let mut acc = vec![1u64; 64];
        let mut acc_here = acc.clone();
        multiply_add(&mut acc, &x, &x);
        multiply_add_portable(&mut acc_here, &x, &x);
        assert_eq!(acc, acc_here);
        assert_eq!(acc[3], 1 + x[3] * x[3]);

        let query: Vec<u64> = (0..256u64)
            .map(|i| (i * 0x1234_5678_9abc) & 0x0fff_ffff_0fff_ffff)
            .collect();
        let items: Vec<u64> = (0..512u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & 0x0fff_ffff_0fff_ffff)
            .collect();
        let mut sums = [[0u64; 4]; 4];
        first_dimension_sums(&query, &items, &mut sums);
        let mut sums_here = [[0u64; 4]; 4];
        first_dimension_sums_portable(&query, &items, &mut sums_here);
        assert_eq!(sums, sums_here);
        for (s, b) in sums.iter().zip(items.chunks_exact(128)) {
            let mut want = [0u64; 4];
            for (pair, &w) in query.chunks_exact(2).zip(b) {
                want[0] += (pair[0] & 0xffff_ffff) * (w & 0xffff_ffff);
                want[1] += (pair[0] >> 32) * (w >> 32);
                want[2] += (pair[1] & 0xffff_ffff) * (w & 0xffff_ffff);
                want[3] += (pair[1] >> 32) * (w >> 32);
            }
            assert_eq!(*s, want);
        }
    }
}
