// The elements one block's scale (and minimum) covers: a pipeline constant, set from the
// weight when its pipeline is made (`launch`'s quantized products), so the division of an
// element's index by it compiles to a shift or a multiply rather than an integer division.
// A multiple of 8, so a packed word (8 codes) lies in one block.
override BLOCK_SIZE: u32;
