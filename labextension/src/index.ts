/**
 * durable-kernel's JupyterLab 4 extension.
 *
 * For a notebook whose kernel is a durable kernel:
 * - a status bar item: "Saved 12 s ago · 1.2 MB", "Saving…", "Not saved: conn", "Checkpoints off";
 * - a notification after each start or restart: what came back (the kernel's restore notice,
 *   received machine-readable over the `durable_kernel` comm), with Details and Undo restore;
 * - a Checkpoints panel in the right sidebar: timeline, diff of two, Restore, Clear;
 * - commands (palette and Kernel menu): Checkpoint now, Pause/resume checkpoints,
 *   Restart kernel fresh (keep checkpoints for undo).
 *
 * Checkpoints are read from the server's REST API under /api/durable/ (kernel/serverapi.py),
 * polled every few seconds while the page is visible and right after each cell: a checkpoint is
 * committed by a forked child of the kernel after the cell has finished, and the store on disk
 * is the one place that knows it committed; polling a cheap GET needs no new push channel in the
 * kernel or the server, and also shows checkpoints made by another client of the same notebook.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  Dialog,
  ICommandPalette,
  Notification,
  showDialog
} from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { IMainMenu } from '@jupyterlab/mainmenu';
import {
  INotebookTracker,
  NotebookActions,
  NotebookPanel
} from '@jupyterlab/notebook';
import { Kernel, KernelMessage, ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';
import { ISignal, Signal } from '@lumino/signaling';

const COMM_TARGET = 'durable_kernel';
const KERNEL_NAME = 'durable-python3';
const POLL_MS = 3000;
const CATEGORY = 'Durable Kernel';

namespace CommandIDs {
  export const checkpointNow = 'durable-kernel:checkpoint-now';
  export const toggle = 'durable-kernel:toggle-checkpoints';
  export const restartFresh = 'durable-kernel:restart-fresh';
  export const openPanel = 'durable-kernel:open-panel';
}

/** What the kernel tells over the comm (kernel.py, frontend_status). */
interface IKernelStatus {
  enabled: boolean;
  off_reason: string;
  first?: boolean;
  start: {
    state: string;
    lines: string[];
    warning: boolean;
    checkpoint?: number;
    created?: number;
    execution_count?: number;
    names?: string[];
  };
}

interface ICheckpoint {
  id: number;
  created: number;
  execution_count: number;
  cell: string;
  added: string[];
  removed: string[];
  changed: string[];
  variables: number;
  size: number;
}

/** GET /api/durable/notebooks/<path> */
interface IDetail {
  path: string;
  size: number;
  checkpoints: ICheckpoint[];
  checkpoint: {
    generation: number;
    created: number;
    size: number;
    skipped: Array<{ name: string; type?: string; reason?: string }>;
  } | null;
  kernel: string | null;
}

export function size(bytes: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

export function ago(unixSeconds: number): string {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
  if (s < 60) {
    return `${s} s ago`;
  }
  if (s < 3600) {
    const m = Math.round(s / 60);
    return `${m} minute${m === 1 ? '' : 's'} ago`;
  }
  if (s < 86400) {
    const h = Math.round(s / 3600);
    return `${h} hour${h === 1 ? '' : 's'} ago`;
  }
  const d = Math.round(s / 86400);
  return `${d} day${d === 1 ? '' : 's'} ago`;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** The server's REST API under /api/durable/. */
async function api(
  method: string,
  path: string,
  suffix = '',
  query = '',
  body?: unknown
): Promise<any> {
  const settings = ServerConnection.makeSettings();
  const url =
    URLExt.join(
      settings.baseUrl,
      'api/durable/notebooks',
      URLExt.encodeParts(path),
      suffix
    ) + query;
  const init: RequestInit = { method };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
  }
  const reply = await ServerConnection.makeRequest(url, init, settings);
  const text = await reply.text();
  const data = text ? JSON.parse(text) : null;
  if (!reply.ok) {
    const error = new Error(
      (data && data.message) || `${reply.status} ${reply.statusText}`
    );
    (error as any).status = reply.status;
    throw error;
  }
  return data;
}

/** Run `%checkpoint ARGS` in the kernel as a silent request; its printed output. */
async function runMagic(kernel: Kernel.IKernelConnection, args: string): Promise<string> {
  const future = kernel.requestExecute({
    code: `%checkpoint ${args}`,
    silent: true,
    store_history: false,
    allow_stdin: false,
    stop_on_error: false
  });
  const out: string[] = [];
  let error = '';
  future.onIOPub = (msg: KernelMessage.IIOPubMessage) => {
    if (KernelMessage.isStreamMsg(msg)) {
      out.push(msg.content.text);
    } else if (KernelMessage.isErrorMsg(msg)) {
      error = `${msg.content.ename}: ${msg.content.evalue}`;
    }
  };
  const reply = await future.done;
  // eslint-disable-next-line no-control-regex
  const text = out.join('').replace(/\x1b\[[0-9;]*[A-Za-z]/g, '').trim();
  if (reply.content.status !== 'ok') {
    throw new Error(error.replace(/\x1b\[[0-9;]*[A-Za-z]/g, '') || text || 'failed');
  }
  return text;
}

/** One notebook's durable state: its kernel's comm, the API's view of its checkpoints. */
class DurableNotebook {
  constructor(readonly panel: NotebookPanel, readonly app: JupyterFrontEnd) {
    const ctx = panel.sessionContext;
    ctx.kernelChanged.connect(() => this.onKernel(), this);
    ctx.statusChanged.connect((_, status) => this.onStatus(status), this);
    ctx.ready.then(() => this.onKernel()).catch(() => undefined);
    NotebookActions.executed.connect(this.onExecuted, this);
    panel.disposed.connect(() => this.dispose());
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get path(): string {
    return this.panel.sessionContext.path;
  }

  get kernel(): Kernel.IKernelConnection | null {
    return this.panel.sessionContext.session?.kernel ?? null;
  }

  /** Is this notebook's kernel a durable kernel (the kernelspec, installed under any name)? */
  get isDurable(): boolean {
    const kernel = this.kernel;
    if (!kernel) {
      return false;
    }
    if (kernel.name === KERNEL_NAME) {
      return true;
    }
    const specs = this.app.serviceManager.kernelspecs.specs;
    const spec = specs?.kernelspecs[kernel.name];
    return !!spec && (spec.argv || []).includes('durable_kernel');
  }

  status: IKernelStatus | null = null;
  detail: IDetail | null = null;
  error = '';
  saving = false;
  freshAfterRestart = false;

  /** Read the API again now. */
  async refresh(): Promise<void> {
    if (!this.isDurable || !this.path) {
      return;
    }
    const newestBefore = this.detail?.checkpoint?.generation;
    try {
      this.detail = await api('GET', this.path);
      this.error = '';
    } catch (e: any) {
      this.detail = null;
      this.error = e.status === 404 ? '' : String(e.message || e);
    }
    const newest = this.detail?.checkpoint?.generation;
    if (this.saving && (newest !== newestBefore || ++this._savingPolls > 3)) {
      this.saving = false;
    }
    this._changed.emit();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.isDisposed = true;
    Signal.clearData(this);
    this._comm = null;
  }

  isDisposed = false;

  private onStatus(status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'starting') {
      this._needComm = true;
    } else if (status === 'idle' && this._needComm) {
      this.onKernel();
    }
  }

  private onKernel(): void {
    this._needComm = false;
    this.status = null;
    this._changed.emit();
    const kernel = this.kernel;
    if (!kernel || !this.isDurable) {
      return;
    }
    try {
      const comm = kernel.createComm(COMM_TARGET);
      comm.onMsg = msg => this.onCommMsg(msg.content.data as any);
      // shows_notices: this frontend shows the restore notice itself, so the kernel drops the
      // copy it would print on the first cell's stderr.
      comm.open({ frontend: 'jupyterlab', shows_notices: true });
      this._comm = comm;
    } catch (e) {
      console.warn('durable-kernel: could not open the comm', e);
    }
    void this.refresh();
  }

  private onCommMsg(status: IKernelStatus): void {
    this.status = status;
    this._changed.emit();
    if (!status.first) {
      return;
    }
    if (this.freshAfterRestart) {
      this.freshAfterRestart = false;
      void this.empty(true);
    } else {
      notifyStart(this, status);
    }
    void this.refresh();
  }

  /** Ask the kernel for its status again (after each cell: `%checkpoint off` may have run). */
  askStatus(): void {
    try {
      this._comm?.send({ request: 'status' });
    } catch {
      // a closed comm: the next start opens another
    }
  }

  private onExecuted(_: any, args: { notebook: any }): void {
    if (args.notebook !== this.panel.content || !this.isDurable) {
      return;
    }
    this.askStatus();
    if (this.status?.enabled !== false) {
      this.saving = true;
      this._savingPolls = 0;
      this._changed.emit();
    }
    // The checkpoint is written after the cell: look soon, then on the regular poll.
    window.setTimeout(() => void this.refresh(), 700);
  }

  /** Undo the start's restore: an empty namespace, the restored state kept as the checkpoint before. */
  async empty(afterRestart: boolean): Promise<void> {
    const kernel = this.kernel;
    if (!kernel) {
      return;
    }
    try {
      const text = await runMagic(kernel, 'empty');
      Notification.info(
        afterRestart
          ? `Restarted fresh: the namespace is empty. ${text}`
          : `Restore undone: the namespace is empty. ${text}`,
        { autoClose: 10000 }
      );
    } catch (e: any) {
      Notification.error(`durable-kernel: could not empty the namespace: ${e.message || e}`);
    }
    void this.refresh();
  }

  private _changed = new Signal<this, void>(this);
  private _comm: Kernel.IComm | null = null;
  private _needComm = false;
  private _savingPolls = 0;
}

function notifyStart(nb: DurableNotebook, status: IKernelStatus): void {
  const start = status.start;
  const text = start.lines.map(l => l.replace(/^durable-kernel: /, '')).join('\n');
  const details = {
    label: 'Details',
    callback: () => {
      void showDialog({
        title: 'durable-kernel: restore',
        body: text || 'Nothing to tell.',
        buttons: [Dialog.okButton()]
      });
    }
  };
  if (start.state === 'restored') {
    const n = (start.names || []).length;
    const when = start.created ? ago(start.created) : 'an earlier session';
    let message = `Restored ${plural(n, 'variable')} from ${when} (In [${start.execution_count}])`;
    const undo = {
      label: 'Undo restore',
      callback: () => void nb.empty(false)
    };
    if (start.warning) {
      message += '; some could not be restored (Details)';
      Notification.warning(message, { autoClose: false, actions: [details, undo] });
    } else {
      Notification.info(message, { autoClose: 15000, actions: [details, undo] });
    }
  } else if (start.warning || start.state === 'failed') {
    Notification.warning(start.lines[0]?.replace(/^durable-kernel: /, '') || 'durable-kernel: restore failed', {
      autoClose: false,
      actions: [details]
    });
  }
}

/** The status bar item: the current notebook's checkpoint state. */
class StatusItem extends Widget {
  constructor(private onClick: () => void) {
    super();
    this.addClass('jp-durable-status');
    this.node.title = 'durable-kernel checkpoints (click for the Checkpoints panel)';
    this.node.addEventListener('click', () => this.onClick());
  }

  show_(nb: DurableNotebook | null): void {
    this.node.textContent = nb ? statusText(nb) : '';
  }
}

export function statusText(nb: DurableNotebook): string {
  const status = nb.status;
  if (status && !status.enabled) {
    return 'Checkpoints off';
  }
  if (nb.saving) {
    return 'Saving…';
  }
  if (nb.error) {
    return 'Checkpoints: error';
  }
  const newest = nb.detail?.checkpoint;
  if (!newest) {
    return 'Not saved yet';
  }
  if (newest.skipped && newest.skipped.length) {
    return `Not saved: ${newest.skipped.map(s => s.name).join(', ')}`;
  }
  return `Saved ${ago(newest.created)} · ${size(newest.size)}`;
}

/** The Checkpoints panel: timeline, diff of two, Restore, Clear. */
class CheckpointsPanel extends Widget {
  constructor(private current: () => DurableNotebook | null) {
    super();
    this.id = 'durable-kernel-checkpoints';
    this.title.caption = 'Checkpoints (durable-kernel)';
    this.title.label = 'Checkpoints';
    this.addClass('jp-durable-panel');
    this.node.innerHTML = `
      <div class="jp-durable-panel-header">
        <span class="jp-durable-panel-name"></span>
        <button class="jp-durable-diff jp-mod-styled" title="Compare the two selected checkpoints">Diff</button>
        <button class="jp-durable-clear jp-mod-styled jp-mod-warn" title="Delete every checkpoint of this notebook">Clear</button>
      </div>
      <div class="jp-durable-message"></div>
      <ol class="jp-durable-timeline"></ol>`;
    this.node.querySelector('.jp-durable-diff')!.addEventListener('click', () => void this.diff());
    this.node.querySelector('.jp-durable-clear')!.addEventListener('click', () => void this.clear());
  }

  private selected: number[] = [];

  private el(selector: string): HTMLElement {
    return this.node.querySelector(selector) as HTMLElement;
  }

  render(): void {
    const nb = this.current();
    const list = this.el('.jp-durable-timeline');
    list.textContent = '';
    if (!nb || !nb.isDurable) {
      this.el('.jp-durable-panel-name').textContent = 'No durable notebook is active.';
      return;
    }
    const detail = nb.detail;
    this.el('.jp-durable-panel-name').textContent = detail
      ? `${nb.path}: ${plural(detail.checkpoints.length, 'checkpoint')}, ${size(detail.size)}`
      : `${nb.path}: no checkpoints${nb.error ? ` (${nb.error})` : ''}`;
    for (const cp of detail?.checkpoints ?? []) {
      const item = document.createElement('li');
      item.className = 'jp-durable-checkpoint';
      item.dataset.id = String(cp.id);
      if (this.selected.includes(cp.id)) {
        item.classList.add('jp-mod-selected');
      }
      const changes = [
        cp.added.length ? `+${cp.added.join(', +')}` : '',
        cp.changed.length ? `~${cp.changed.join(', ~')}` : '',
        cp.removed.length ? `-${cp.removed.join(', -')}` : ''
      ]
        .filter(Boolean)
        .join(' ');
      const head = document.createElement('div');
      head.className = 'jp-durable-checkpoint-head';
      head.textContent = `#${cp.id} · ${new Date(cp.created * 1000).toLocaleTimeString()} · In [${cp.execution_count}] · ${size(cp.size)}`;
      const cell = document.createElement('div');
      cell.className = 'jp-durable-checkpoint-cell';
      cell.textContent = cp.cell || '(no cell)';
      const change = document.createElement('div');
      change.className = 'jp-durable-checkpoint-changes';
      change.textContent = changes || '(no change)';
      const restore = document.createElement('button');
      restore.className = 'jp-durable-restore jp-mod-styled';
      restore.textContent = 'Restore';
      restore.addEventListener('click', event => {
        event.stopPropagation();
        void this.restore(cp);
      });
      item.append(head, cell, change, restore);
      item.addEventListener('click', () => {
        this.selected = this.selected.includes(cp.id)
          ? this.selected.filter(id => id !== cp.id)
          : [...this.selected, cp.id].slice(-2);
        this.render();
      });
      list.append(item);
    }
  }

  private say(text: string): void {
    this.el('.jp-durable-message').textContent = text;
  }

  private async diff(): Promise<void> {
    const nb = this.current();
    if (!nb) {
      return;
    }
    const [a, b] = [...this.selected].sort((x, y) => x - y);
    const query = a === undefined ? '' : b === undefined ? `?a=${a}` : `?a=${a}&b=${b}`;
    try {
      const d = await api('GET', nb.path, 'diff', query);
      const part = (sign: string, names: string[]) => (names.length ? `${sign} ${names.join(', ')}` : '');
      this.say(
        `#${d.a} → #${d.b}: ` +
          ([part('added', d.added), part('changed', d.changed), part('removed', d.removed)]
            .filter(Boolean)
            .join('; ') || 'no difference')
      );
    } catch (e: any) {
      this.say(`Diff: ${e.message || e}`);
    }
  }

  private async restore(cp: ICheckpoint): Promise<void> {
    const nb = this.current();
    if (!nb) {
      return;
    }
    const answer = await showDialog({
      title: `Restore checkpoint ${cp.id}?`,
      body:
        `The variables become those of In [${cp.execution_count}] (${ago(cp.created)}). ` +
        'The current state is kept as a checkpoint, so this can be undone.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Restore' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      const reply = await api('POST', nb.path, 'restore', '', { checkpoint: cp.id });
      this.say(reply.message || `Restored checkpoint ${cp.id}.`);
      Notification.success(`Restored checkpoint ${cp.id}`, { autoClose: 5000 });
    } catch (e: any) {
      this.say(`Restore: ${e.message || e}`);
    }
    await nb.refresh();
  }

  private async clear(): Promise<void> {
    const nb = this.current();
    if (!nb) {
      return;
    }
    const answer = await showDialog({
      title: 'Clear checkpoints?',
      body: `Delete every checkpoint of ${nb.path}: a restart then starts with an empty namespace. This cannot be undone.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Clear' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      const reply = await api('DELETE', nb.path);
      this.say(reply.message || 'Cleared.');
    } catch (e: any) {
      this.say(`Clear: ${e.message || e}`);
    }
    this.selected = [];
    await nb.refresh();
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'durable-kernel:plugin',
  description: 'Checkpoint status, restore notifications, a checkpoints panel and commands for durable-kernel.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ICommandPalette, IMainMenu, ILabShell],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null,
    mainMenu: IMainMenu | null,
    labShell: ILabShell | null
  ) => {
    const notebooks = new Map<NotebookPanel, DurableNotebook>();
    const current = (): DurableNotebook | null => {
      const panel = tracker.currentWidget;
      return panel ? notebooks.get(panel) ?? null : null;
    };
    const panel = new CheckpointsPanel(current);
    app.shell.add(panel, 'right', { rank: 900 });
    const openPanel = () => {
      app.shell.activateById(panel.id);
      void current()?.refresh();
    };
    const item = new StatusItem(openPanel);
    const update = () => {
      const nb = current();
      item.show_(nb && nb.isDurable ? nb : null);
      statusChanged.emit();
      if (panel.isVisible) {
        panel.render();
      }
      app.commands.notifyCommandChanged(CommandIDs.toggle);
    };
    const statusChanged = new Signal<any, void>(panel);

    tracker.widgetAdded.connect((_, nbPanel) => {
      const nb = new DurableNotebook(nbPanel, app);
      notebooks.set(nbPanel, nb);
      nb.changed.connect(() => {
        if (current() === nb) {
          update();
        }
      });
      nbPanel.disposed.connect(() => notebooks.delete(nbPanel));
    });
    tracker.currentChanged.connect(() => {
      update();
      void current()?.refresh();
    });
    panel.node.addEventListener('lm-afterattach', () => panel.render());
    labShell?.activeChanged.connect(() => {
      if (panel.isVisible) {
        panel.render();
      }
    });

    if (statusBar) {
      statusBar.registerStatusItem('durable-kernel:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => !!current()?.isDurable,
        activeStateChanged: statusChanged
      });
    }

    // Poll while the page is visible (a hidden tab costs the server nothing).
    window.setInterval(() => {
      const nb = current();
      if (document.visibilityState === 'visible' && nb && nb.isDurable) {
        void nb.refresh();
      } else {
        update();
      }
    }, POLL_MS);

    const durable = () => !!current()?.isDurable && !!current()?.kernel;
    app.commands.addCommand(CommandIDs.checkpointNow, {
      label: 'Checkpoint Now',
      caption: 'Save a checkpoint of the namespace now (%checkpoint save)',
      isEnabled: durable,
      execute: async () => {
        const nb = current();
        if (!nb?.kernel) {
          return;
        }
        try {
          await runMagic(nb.kernel, 'save');
          Notification.success('Checkpoint saved', { autoClose: 3000 });
        } catch (e: any) {
          Notification.error(`Checkpoint not saved: ${e.message || e}`);
        }
        await nb.refresh();
      }
    });
    app.commands.addCommand(CommandIDs.toggle, {
      label: 'Pause/Resume Checkpoints',
      caption: 'Pause or resume saving after every cell for this kernel (%checkpoint off / on)',
      isEnabled: durable,
      isToggled: () => current()?.status?.enabled === false,
      execute: async () => {
        const nb = current();
        if (!nb?.kernel) {
          return;
        }
        const off = nb.status?.enabled !== false;
        try {
          const text = await runMagic(nb.kernel, off ? 'off' : 'on');
          Notification.info(text, { autoClose: 4000 });
        } catch (e: any) {
          Notification.error(`${e.message || e}`);
        }
        nb.askStatus();
      }
    });
    app.commands.addCommand(CommandIDs.restartFresh, {
      label: 'Restart Kernel Fresh (Keep Checkpoints for Undo)',
      caption:
        'Restart the kernel, then empty the namespace it restored; the restored state stays the checkpoint ' +
        'before (%checkpoint undo, or Restore in the Checkpoints panel, brings it back)',
      isEnabled: durable,
      execute: async () => {
        const nb = current();
        if (!nb?.kernel) {
          return;
        }
        nb.freshAfterRestart = true;
        await nb.panel.sessionContext.restartKernel();
      }
    });
    app.commands.addCommand(CommandIDs.openPanel, {
      label: 'Show Checkpoints Panel',
      execute: openPanel
    });
    for (const command of Object.values(CommandIDs)) {
      palette?.addItem({ command, category: CATEGORY });
    }
    mainMenu?.kernelMenu.addGroup(
      [
        { command: CommandIDs.checkpointNow },
        { command: CommandIDs.toggle },
        { command: CommandIDs.restartFresh },
        { command: CommandIDs.openPanel }
      ],
      50
    );
  }
};

export default plugin;
