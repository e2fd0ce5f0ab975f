// The VS Code adapter: the only file that imports `vscode`. It reads the settings, registers the inline
// completion provider and the status-bar item, and feeds document edits to the completion logic
// (completion.ts), which does the actual work.

import * as vscode from 'vscode';
import { Completer, Settings, Status, splitAt } from './completion';

function settings(): Settings {
  const c = vscode.workspace.getConfiguration('ds4');
  return {
    enable: c.get('enable', true),
    socketPath: c.get('socketPath', ''),
    maxTokens: c.get('maxTokens', 64),
    debounceMs: c.get('debounceMs', 150),
  };
}

function documentText(path: string): string | undefined {
  return vscode.workspace.textDocuments.find((d) => vscode.workspace.asRelativePath(d.uri) === path)?.getText();
}

export function activate(context: vscode.ExtensionContext): void {
  const completer = new Completer(settings);

  const item = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  item.command = 'ds4.toggle';
  const show = (s: Status) => {
    const rate = s.tokensPerSecond ? ` ${s.tokensPerSecond.toFixed(0)} tok/s` : '';
    item.text = !settings().enable ? '$(circle-slash) ds4' : s.connected ? `$(sparkle) ds4${rate}` : '$(debug-disconnect) ds4';
    item.tooltip = s.connected
      ? `ds4: connected, ${s.model}${s.demo ? ' (the random demo model: its output is gibberish)' : ''}` +
        (s.detail ? `\nlast error: ${s.detail}` : '')
      : `ds4: not connected${s.detail ? ` (${s.detail})` : ''}`;
  };
  completer.onStatus(show);
  show(completer.status);
  item.show();

  context.subscriptions.push(
    item,
    vscode.languages.registerInlineCompletionItemProvider({ pattern: '**' }, {
      async provideInlineCompletionItems(document, position, _context, token) {
        const { prefix, suffix } = splitAt(document.getText(), document.offsetAt(position));
        const chunks = completer.recent.chunks(vscode.workspace.asRelativePath(document.uri), documentText);
        const text = await completer.complete({ prefix, suffix, context: chunks }, token);
        return text === undefined ? [] : [new vscode.InlineCompletionItem(text, new vscode.Range(position, position))];
      },
    }),
    vscode.workspace.onDidChangeTextDocument((e) => {
      if (e.contentChanges.length > 0 && e.document.uri.scheme !== 'output') {
        completer.recent.touch(vscode.workspace.asRelativePath(e.document.uri), e.contentChanges[0].range.start.line);
      }
    }),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration('ds4.socketPath')) completer.reset();
      if (e.affectsConfiguration('ds4')) show(completer.status);
    }),
    vscode.commands.registerCommand('ds4.toggle', () =>
      vscode.workspace.getConfiguration('ds4').update('enable', !settings().enable, vscode.ConfigurationTarget.Global),
    ),
    { dispose: () => completer.dispose() },
  );
}
