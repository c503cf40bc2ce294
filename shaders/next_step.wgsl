// The next decode step's inputs, made on the device, so that several decode steps run in one
// submit: each row's sampled id becomes its token, its position and its sampler's step counter go
// up by one, and the id is kept in `history` (bound at this step's place). `inputs` is the whole
// step-inputs buffer as words; TOKENS, POSITIONS and SAMPLING are where those regions start.
// Dispatch (1, R): a decode step's rows are its tokens (row r feeds token r).
// Consts: TOKENS, POSITIONS, SAMPLING, PARAM_WORDS (words per sampler row), STEP_WORD (its counter's).

@group(0) @binding(0) var<storage, read_write> inputs: array<u32>;
@group(0) @binding(1) var<storage, read> sampled: array<u32>;  // [R]
@group(0) @binding(2) var<storage, read_write> history: array<u32>;  // [R]: this step's ids

@compute @workgroup_size(1)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let r = id.y;
    let token = sampled[r];
    inputs[TOKENS + r] = token;
    inputs[POSITIONS + r] += 1u;
    inputs[SAMPLING + r * PARAM_WORDS + STEP_WORD] += 1u;
    history[r] = token;
}
