// The CommonJS view of the package (`require` condition: dist/index.cjs with dist/index.d.cts).
import nudge = require('@nudge/client');

const client: nudge.NudgeClient = new nudge.NudgeClient('wss://nudge.example.com/ws', { token: 'a.b.c', autoConnect: false });
const Default: typeof nudge.NudgeClient = nudge.default;
client.on('state', ({ state }) => void state);
const error: nudge.NudgeError = new nudge.NudgeError('closed', 'x');
void [Default, error.closeCode];
